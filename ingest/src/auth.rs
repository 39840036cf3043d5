//! Buyer authentication (JWT) and the operator token.
//!
//! Buyer tokens are verified with an algorithm allowlist (HMAC only, as the key is a shared
//! secret), and `exp`, `iss`, `aud` and `sub` are required; the user id is `sub`. A token
//! whose header says `alg: none`, or any algorithm outside the list, is refused. Operator
//! routes take a static bearer token compared in constant time.

use crate::problem::ApiError;
use http::{header, HeaderMap};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use storage::{Timestamp, UserId};

/// Settings of buyer and operator authentication.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// HMAC secret buyer tokens are signed with.
    pub jwt_secret: SecretString,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Accepted algorithms (HS256, HS384, HS512).
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`.
    pub leeway: Duration,
    /// Bearer token of the operator routes.
    pub operator_token: SecretString,
}

/// Claims of a buyer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
}

/// Errors of the authentication configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// An algorithm that is not HMAC.
    #[error(
        "auth.algorithms: only HS256, HS384 and HS512 can be used with a shared secret, got {0:?}"
    )]
    UnsupportedAlgorithm(Algorithm),
    /// No algorithm at all.
    #[error("auth.algorithms must name at least one algorithm")]
    NoAlgorithm,
    /// Secret too short to be safe.
    #[error("auth.jwt_secret must be at least 16 bytes")]
    WeakSecret,
}

/// Verifies buyer tokens and the operator token.
pub struct Auth {
    decoding: DecodingKey,
    validation: Validation,
    operator_token: SecretString,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::missing_token("send Authorization: Bearer <token>"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::invalid_token("Authorization header is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::invalid_token("Authorization must use the Bearer scheme"))?;
    Ok(token.trim())
}

impl Auth {
    /// Builds the verifier; refuses non-HMAC algorithms and short secrets.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let first = *config
            .algorithms
            .first()
            .ok_or(AuthConfigError::NoAlgorithm)?;
        for alg in &config.algorithms {
            if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(AuthConfigError::UnsupportedAlgorithm(*alg));
            }
        }
        if config.jwt_secret.expose_secret().len() < 16 {
            return Err(AuthConfigError::WeakSecret);
        }
        let mut validation = Validation::new(first);
        validation.algorithms = config.algorithms.clone();
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        Ok(Auth {
            decoding: DecodingKey::from_secret(config.jwt_secret.expose_secret().as_bytes()),
            validation,
            operator_token: config.operator_token.clone(),
        })
    }

    /// The buyer behind the request's bearer token.
    pub fn buyer(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        let token = bearer(headers)?;
        self.verify(token)
    }

    /// Verifies a buyer token and returns its user.
    pub fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::token_expired("the token has expired"),
                ErrorKind::InvalidSignature => ApiError::invalid_token("bad signature"),
                ErrorKind::InvalidAlgorithm => ApiError::invalid_token("algorithm not allowed"),
                ErrorKind::InvalidIssuer => ApiError::invalid_token("wrong issuer"),
                ErrorKind::InvalidAudience => ApiError::invalid_token("wrong audience"),
                ErrorKind::MissingRequiredClaim(_) => {
                    ApiError::invalid_token("a required claim is missing")
                }
                _ => ApiError::invalid_token("the token cannot be decoded"),
            })?;
        UserId::parse(data.claims.sub).map_err(|_| ApiError::invalid_token("invalid sub claim"))
    }

    /// Checks the operator token.
    pub fn operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = bearer(headers)?;
        if constant_time_eq::constant_time_eq(
            token.as_bytes(),
            self.operator_token.expose_secret().as_bytes(),
        ) {
            Ok(())
        } else {
            Err(ApiError::invalid_token("not the operator token"))
        }
    }
}

/// Signs a buyer token for `user` valid for `ttl` (used by `flashsale token`, the demo and
/// the load tests).
pub fn issue_token(
    config: &AuthConfig,
    user: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = (Timestamp::now().millis() / 1000).max(0) as u64;
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs(),
        iat: now,
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
    };
    let alg = config
        .algorithms
        .first()
        .copied()
        .unwrap_or(Algorithm::HS256);
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(config.jwt_secret.expose_secret().as_bytes()),
    )
}
