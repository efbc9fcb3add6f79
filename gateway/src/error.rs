//! Why the proxy answered a request itself, and the one place such answers become responses.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{ProxyBody, full};

/// A request the proxy answers itself instead of with an upstream response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No route matched (`NR`).
    #[error("no route matched")]
    NoRoute,
    /// The route's rate limit is exceeded (`RL`).
    #[error("rate limited")]
    RateLimited {
        /// When a token will be available.
        retry_after: Duration,
    },
    /// The cluster has no endpoints (`UH`).
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// A circuit breaker is open (`UO`).
    #[error("upstream overflow")]
    Overflow,
    /// Could not connect (`UF`).
    #[error("upstream connect error: {0}")]
    ConnectFailure(String),
    /// The upstream reset or closed the stream before responding (`UC`).
    #[error("upstream reset: {0}")]
    Reset(String),
    /// The upstream took too long (`UT`).
    #[error("upstream timeout")]
    Timeout,
    /// The downstream request is malformed (`DPE`).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The filters changed a streaming request body's length while keeping its
    /// `content-length`: the upstream request was cut off. Not the upstream's fault: neither
    /// retried nor counted against the endpoint.
    #[error("{0}")]
    FilterBodyLength(crate::filter::chain::LengthChanged),
}

impl ProxyError {
    /// The status code sent downstream.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoHealthyUpstream
            | ProxyError::Overflow
            | ProxyError::ConnectFailure(_)
            | ProxyError::Reset(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::FilterBodyLength(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Envoy's response flag for the access log.
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "NR",
            ProxyError::RateLimited { .. } => "RL",
            ProxyError::NoHealthyUpstream => "UH",
            ProxyError::Overflow => "UO",
            ProxyError::ConnectFailure(_) => "UF",
            ProxyError::Reset(_) => "UC",
            ProxyError::Timeout => "UT",
            ProxyError::BadRequest(_) => "DPE",
            ProxyError::FilterBodyLength(_) => "",
        }
    }

    /// Envoy's response code details.
    pub fn details(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "route_not_found",
            ProxyError::RateLimited { .. } => "local_rate_limited",
            ProxyError::NoHealthyUpstream => "no_healthy_upstream",
            ProxyError::Overflow => "upstream_reset_before_response_started{overflow}",
            ProxyError::ConnectFailure(_) => {
                "upstream_reset_before_response_started{connection_failure}"
            }
            ProxyError::Reset(_) => "upstream_reset_before_response_started{remote_reset}",
            ProxyError::Timeout => "upstream_response_timeout",
            ProxyError::BadRequest(_) => "http1.codec_error",
            ProxyError::FilterBodyLength(_) => "wasm_body_length_changed",
        }
    }

    /// The local reply.
    pub fn into_response(&self) -> Response<ProxyBody> {
        let body = match self {
            ProxyError::NoRoute => String::new(),
            ProxyError::RateLimited { .. } => "local_rate_limited\n".to_string(),
            ProxyError::NoHealthyUpstream => "no healthy upstream\n".to_string(),
            ProxyError::Overflow => "upstream connect error or disconnect/reset before headers. reset reason: overflow\n".to_string(),
            ProxyError::ConnectFailure(e) => format!(
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {e}\n"
            ),
            ProxyError::Reset(e) => format!("upstream connect error or disconnect/reset before headers. reset reason: {e}\n"),
            ProxyError::Timeout => "upstream request timeout\n".to_string(),
            ProxyError::BadRequest(why) => format!("bad request: {why}\n"),
            ProxyError::FilterBodyLength(_) => "filter changed the request body's length\n".to_string(),
        };
        let mut resp = Response::new(full(body.clone()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        if !body.is_empty() {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let ProxyError::RateLimited { retry_after } = self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let ProxyError::BadRequest(_) = self {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
