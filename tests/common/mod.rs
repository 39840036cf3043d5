//! Test support: start the whole system embedded on port 0 in a temp dir, and talk to it
//! over real HTTP.
#![allow(dead_code)]

use flashsale::app::{App, Running};
use flashsale::config::Config;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::time::Duration;

/// Which admission backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process counters.
    Embedded,
    /// A real redis-server of the test's own.
    Redis,
    /// A Redis Cluster of three primaries of the test's own.
    RedisCluster,
}

pub struct TestApp {
    pub running: Option<Running>,
    pub redis: Option<testkit::RedisServer>,
    pub redis_cluster: Option<testkit::RedisCluster>,
    pub url: String,
    pub config: Config,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body.get("code").and_then(Value::as_str).unwrap_or("")
    }
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    pub async fn start_on(backend: Backend) -> TestApp {
        Self::start_on_with(backend, |_| {}).await
    }

    pub async fn start_on_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        match backend {
            Backend::Embedded => Self::start_with(tweak).await,
            Backend::Redis => {
                let redis = testkit::RedisServer::start();
                let url = redis.url();
                let mut app = Self::start_with(|c| {
                    c.admission.url = url;
                    tweak(c);
                })
                .await;
                app.redis = Some(redis);
                app
            }
            Backend::RedisCluster => {
                let cluster = testkit::RedisCluster::start(3);
                let url = cluster.url();
                let mut app = Self::start_with(|c| {
                    c.admission.url = url;
                    tweak(c);
                })
                .await;
                app.redis_cluster = Some(cluster);
                app
            }
        }
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        // Tests share two cores with their servers; a decision deadline tuned for
        // production would turn scheduling delays into 503s. Tests of the deadline set it.
        config.admission.decision_timeout = Duration::from_secs(2);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = App::start(&config, listener).await.expect("start");
        let url = running.url();
        TestApp {
            running: Some(running),
            redis: None,
            redis_cluster: None,
            url,
            config,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(512)
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn operator(&self) -> String {
        self.config.auth.operator_token.expose_secret().to_owned()
    }

    pub fn token(&self, user: &str) -> String {
        let auth = self.config.auth.to_auth_config().expect("auth");
        ingest::auth::issue_token(&auth, user, Duration::from_secs(3600)).expect("token")
    }

    pub async fn answer(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn create_sale(&self, body: Value) -> Answer {
        let resp = self
            .client
            .post(format!("{}/v1/sales", self.url))
            .bearer_auth(self.operator())
            .json(&body)
            .send()
            .await
            .expect("send");
        Self::answer(resp).await
    }

    /// A sale open now with `stock` units and the given per-user limit.
    pub async fn sale(&self, id: &str, stock: u32, limit: u32) -> String {
        let a = self
            .create_sale(json!({
                "id": id, "sku": "sku-1", "stock": stock, "price_cents": 1000,
                "currency": "EUR", "per_user_limit": limit,
                "user_rate": {"per_second": 1000, "burst": 1000}
            }))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        id.to_owned()
    }

    pub async fn order(&self, sale: &str, token: &str, key: &str, quantity: i64) -> Answer {
        let resp = self
            .client
            .post(format!("{}/v1/sales/{sale}/orders", self.url))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&json!({"quantity": quantity, "payment_token": "tok_visa"}))
            .send()
            .await
            .expect("send");
        Self::answer(resp).await
    }

    pub async fn stats(&self, sale: &str) -> Value {
        let resp = self
            .client
            .get(format!("{}/v1/sales/{sale}/stats", self.url))
            .bearer_auth(self.operator())
            .send()
            .await
            .expect("send");
        let a = Self::answer(resp).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    pub async fn stock_left(&self, sale: &str) -> i64 {
        self.stats(sale).await["stock_left"]
            .as_i64()
            .expect("stock_left")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("stop");
        }
    }
}
