//! Pure matching of a request against compiled routes: no I/O, no allocation on the common path.

use http::{HeaderMap, Method};
use regex::Regex;

/// How the path must match.
#[derive(Debug, Clone)]
pub enum PathCond {
    /// Any path.
    Any,
    /// The path equals this.
    Exact(String),
    /// The path starts with this.
    Prefix(String),
    /// The whole path matches (the regex is anchored when compiled).
    Regex(Regex),
}

/// How a value (header or query parameter) must match.
#[derive(Debug, Clone)]
pub enum ValueCond {
    /// Present, any value.
    Present,
    /// Absent.
    Absent,
    /// Equal to this.
    Exact(String),
    /// Starts with this.
    Prefix(String),
    /// Whole value matches.
    Regex(Regex),
}

impl ValueCond {
    fn matches_value(&self, value: &[u8]) -> bool {
        match self {
            ValueCond::Present => true,
            ValueCond::Absent => false,
            ValueCond::Exact(s) => value == s.as_bytes(),
            ValueCond::Prefix(s) => value.starts_with(s.as_bytes()),
            ValueCond::Regex(r) => std::str::from_utf8(value).is_ok_and(|v| r.is_match(v)),
        }
    }
}

/// Every condition of one route.
#[derive(Debug, Clone)]
pub struct Conditions {
    /// Path condition.
    pub path: PathCond,
    /// Header conditions (name lower-case).
    pub headers: Vec<(http::HeaderName, ValueCond)>,
    /// Query conditions.
    pub query: Vec<(String, ValueCond)>,
    /// Allowed methods; empty means any.
    pub methods: Vec<Method>,
}

/// The parts of a request that routing looks at.
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl Conditions {
    /// Whether the request satisfies every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathCond::Any => true,
            PathCond::Exact(p) => req.path == p,
            PathCond::Prefix(p) => req.path.starts_with(p.as_str()),
            PathCond::Regex(r) => r.is_match(req.path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return false;
        }
        for (name, cond) in &self.headers {
            let ok = match cond {
                ValueCond::Absent => !req.headers.contains_key(name),
                ValueCond::Present => req.headers.contains_key(name),
                _ => req
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|v| cond.matches_value(v.as_bytes())),
            };
            if !ok {
                return false;
            }
        }
        for (name, cond) in &self.query {
            let value = query_param(req.query, name);
            let ok = match (cond, &value) {
                (ValueCond::Absent, v) => v.is_none(),
                (_, None) => false,
                (c, Some(v)) => c.matches_value(v.as_bytes()),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// The first value of query parameter `name`, decoded as `application/x-www-form-urlencoded`.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// How a host pattern matches a request host (lower-case, without port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Exactly this host.
    Exact(String),
    /// `*.suffix`: any host ending with `.suffix` (stored with the leading dot).
    Suffix(String),
    /// Any host.
    Any,
}

impl HostPattern {
    /// Parse `api.example.com`, `*.example.com` or `*`.
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!("invalid host pattern `{s}`"));
            }
            return Ok(HostPattern::Suffix(format!(".{rest}")));
        }
        if s.is_empty() || s.contains('*') || s.contains('/') {
            return Err(format!(
                "invalid host `{s}`: write `name.example.com`, `*.example.com` or `*`"
            ));
        }
        Ok(HostPattern::Exact(s))
    }
}

/// The host of a request, lower-cased, without the port (`[v6]` keeps its brackets).
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        m: &'a Method,
        path: &'a str,
        q: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method: m,
            path,
            query: q,
            headers: h,
        }
    }

    #[test]
    fn path_conditions() {
        let h = HeaderMap::new();
        let get = Method::GET;
        let mut c = Conditions {
            path: PathCond::Prefix("/api".into()),
            headers: vec![],
            query: vec![],
            methods: vec![],
        };
        assert!(c.matches(&view(&get, "/api/x", None, &h)));
        assert!(!c.matches(&view(&get, "/ap", None, &h)));
        c.path = PathCond::Exact("/a".into());
        assert!(c.matches(&view(&get, "/a", None, &h)));
        assert!(!c.matches(&view(&get, "/a/", None, &h)));
        c.path = PathCond::Regex(Regex::new("^(?:/u/[0-9]+)$").unwrap());
        assert!(c.matches(&view(&get, "/u/12", None, &h)));
        assert!(!c.matches(&view(&get, "/u/12/x", None, &h)));
        c.methods = vec![Method::POST];
        assert!(!c.matches(&view(&get, "/u/12", None, &h)));
    }

    #[test]
    fn header_and_query_conditions() {
        let mut h = HeaderMap::new();
        h.insert("x-env", "canary-1".parse().unwrap());
        let get = Method::GET;
        let c = Conditions {
            path: PathCond::Any,
            headers: vec![
                ("x-env".parse().unwrap(), ValueCond::Prefix("canary".into())),
                ("x-debug".parse().unwrap(), ValueCond::Absent),
            ],
            query: vec![("v".into(), ValueCond::Exact("a b".into()))],
            methods: vec![],
        };
        assert!(c.matches(&view(&get, "/", Some("x=1&v=a%20b"), &h)));
        assert!(!c.matches(&view(&get, "/", Some("v=c"), &h)));
        assert!(!c.matches(&view(&get, "/", None, &h)));
        h.insert("x-debug", "1".parse().unwrap());
        assert!(!c.matches(&view(&get, "/", Some("v=a+b"), &h)));
    }

    #[test]
    fn hosts() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("a.b."), "a.b");
        assert_eq!(
            HostPattern::parse("*.Example.com"),
            Ok(HostPattern::Suffix(".example.com".into()))
        );
        assert!(HostPattern::parse("a*.b").is_err());
        assert_eq!(query_param(Some("a=%zz&b=1"), "a").as_deref(), Some("%zz"));
    }
}
