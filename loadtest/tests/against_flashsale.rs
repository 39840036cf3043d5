//! The load test binary against a real flashsale (embedded, started in this process on a
//! free port): each scenario runs, its invariant checks pass and it exits 0; a run whose
//! buyers cannot authenticate fails its checks and exits 1.

use std::path::Path;
use std::process::Command;

async fn serve(dir: &Path) -> flashsale::app::Running {
    let config = flashsale::config::Config {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    flashsale::app::App::start(&config, listener)
        .await
        .expect("start flashsale")
}

fn loadtest(host: &str, reports: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--host",
            host,
            "--report-dir",
            &reports.display().to_string(),
        ])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run loadtest");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_its_checks_and_bad_tokens_fail_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = serve(dir.path()).await;
    let host = running.url();
    let reports = dir.path().join("reports");
    for (scenario, extra) in [
        ("rush", vec!["--stock", "200", "--rush-delay", "1s"]),
        ("steady", vec!["--stock", "2000", "--rate", "50"]),
        ("retry-storm", vec!["--stock", "2000"]),
        ("browse-buy", vec!["--stock", "200"]),
    ] {
        let mut args = vec!["--scenario", scenario];
        args.extend(extra);
        args.extend(["--", "-u", "8", "-t", "3s", "--no-telnet"]);
        let (code, text) = loadtest(&host, &reports, &args, &[]);
        assert_eq!(code, 0, "scenario {scenario}:\n{text}");
        let checks = reports.join(format!("{scenario}-checks.json"));
        let checks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&checks).expect("checks file")).expect("json");
        assert!(!checks.to_string().contains("\"fail"), "{checks}");
        for ext in ["html", "json"] {
            assert!(
                reports.join(format!("{scenario}.{ext}")).is_file(),
                "goose {ext} report of {scenario}"
            );
        }
    }
    // Buyers signed with the wrong secret get 401: errors, failed checks, exit 1.
    let (code, text) = loadtest(
        &host,
        &reports,
        &[
            "--scenario",
            "rush",
            "--stock",
            "10",
            "--rush-delay",
            "0s",
            "--",
            "-u",
            "2",
            "-t",
            "2s",
            "--no-telnet",
        ],
        &[("FLASHSALE_AUTH__JWT_SECRET", "not-the-server-secret")],
    );
    assert_eq!(code, 1, "{text}");
    running.stop().await.expect("stop");
}
