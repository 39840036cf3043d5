//! Buyer tokens: HMAC-signed JWTs with `sub`, `exp`, `iat`, `iss` and `aud`, as the
//! server's `ingest::auth` verifies them.

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    iss: &'a str,
    aud: &'a str,
}

/// Signs buyer tokens.
pub struct TokenSigner {
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("alg", &self.header.alg)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A signer for `algorithm` (HS256, HS384 or HS512) with the shared `secret`.
    pub fn new(
        secret: &str,
        algorithm: &str,
        issuer: &str,
        audience: &str,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let alg = Algorithm::from_str(algorithm)
            .with_context(|| format!("unknown JWT algorithm {algorithm:?}"))?;
        if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            bail!("the JWT algorithm must be HS256, HS384 or HS512, got {algorithm}");
        }
        Ok(TokenSigner {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(alg),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl,
        })
    }

    /// A token for `user`, valid for the signer's time to live from now.
    pub fn sign(&self, user: &str) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: user,
            exp: now + self.ttl.as_secs().max(1),
            iat: now,
            iss: &self.issuer,
            aud: &self.audience,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("signing a buyer token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingest::auth::{Auth, AuthConfig};
    use secrecy::SecretString;

    const SECRET: &str = "flashsale-dev-secret-change-me";

    fn server(algorithms: Vec<Algorithm>) -> Auth {
        Auth::new(&AuthConfig {
            jwt_secret: SecretString::from(SECRET),
            issuer: "flashsale".into(),
            audience: "flashsale-buyers".into(),
            algorithms,
            leeway: Duration::from_secs(5),
            operator_token: SecretString::from("op"),
        })
        .expect("valid auth config")
    }

    #[test]
    fn tokens_are_accepted_by_the_server_verifier() {
        let signer = TokenSigner::new(
            SECRET,
            "HS256",
            "flashsale",
            "flashsale-buyers",
            Duration::from_secs(3600),
        )
        .expect("signer");
        let token = signer.sign("lt-1-b42").expect("token");
        let user = server(vec![Algorithm::HS256])
            .verify(&token)
            .expect("ingest accepts the token");
        assert_eq!(user.as_str(), "lt-1-b42");
    }

    #[test]
    fn other_hmac_algorithms_match_the_server_allowlist() {
        let ttl = Duration::from_secs(60);
        let signer = TokenSigner::new(SECRET, "HS512", "flashsale", "flashsale-buyers", ttl)
            .expect("signer");
        let token = signer.sign("u1").expect("token");
        assert!(server(vec![Algorithm::HS512]).verify(&token).is_ok());
        assert!(server(vec![Algorithm::HS256]).verify(&token).is_err());
    }

    #[test]
    fn a_wrong_secret_issuer_or_audience_is_refused() {
        let ttl = Duration::from_secs(60);
        let auth = server(vec![Algorithm::HS256]);
        for signer in [
            TokenSigner::new(
                "another-secret-of-16+",
                "HS256",
                "flashsale",
                "flashsale-buyers",
                ttl,
            ),
            TokenSigner::new(SECRET, "HS256", "someone", "flashsale-buyers", ttl),
            TokenSigner::new(SECRET, "HS256", "flashsale", "others", ttl),
        ] {
            let token = signer.expect("signer").sign("u1").expect("token");
            assert!(auth.verify(&token).is_err());
        }
    }

    #[test]
    fn non_hmac_algorithms_are_refused() {
        let ttl = Duration::from_secs(60);
        assert!(TokenSigner::new(SECRET, "RS256", "i", "a", ttl).is_err());
        assert!(TokenSigner::new(SECRET, "none", "i", "a", ttl).is_err());
    }
}
