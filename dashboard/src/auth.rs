//! The dashboard's token check, the same bearer token as the gRPC API.
//!
//! A request is let in by `Authorization: Bearer <token>` or by the
//! `sluice_token` cookie (HttpOnly, SameSite=Strict, Secure over TLS). A page
//! opened with `?token=...` sets the cookie and is redirected to the same
//! address without it, so the token does not stay in the address bar, the
//! history or a proxy's log of later requests; a page opened without a
//! token shows a login form that posts it (never in a URL). The dashboard
//! logs no query strings.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

const COOKIE: &str = "sluice_token";

/// What to do with a request for a page.
pub enum Verdict {
    Allowed,
    /// A redirect (token taken from the query) or a refusal (login form).
    Respond(Response),
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    pub token: String,
    /// Where to go after logging in (a path on this server).
    #[serde(default)]
    pub next: String,
}

/// The expected token (none: everything is open).
#[derive(Debug, Clone)]
pub struct Auth {
    expected: Option<Vec<u8>>,
    secure: bool,
}

impl Auth {
    pub fn new(token: Option<&str>, secure: bool) -> Self {
        Auth { expected: token.filter(|t| !t.is_empty()).map(|t| t.as_bytes().to_vec()), secure }
    }

    fn is(&self, candidate: &[u8]) -> bool {
        self.expected.as_deref().is_some_and(|e| sluice_proto::auth::same(candidate, e))
    }

    /// The request carries the token (or none is needed).
    fn carries(&self, headers: &HeaderMap) -> bool {
        if self.expected.is_none() {
            return true;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .filter(|v| v.get(..7).is_some_and(|s| s.eq_ignore_ascii_case(b"bearer ")))
            .is_some_and(|v| self.is(&v[7..]));
        bearer || cookie(headers).and_then(|hex| unhex(&hex)).is_some_and(|t| self.is(&t))
    }

    /// An API call: `None` lets it through, else the 401 to answer.
    pub fn api(&self, headers: &HeaderMap) -> Option<Response> {
        if self.carries(headers) {
            return None;
        }
        let body = serde_json::json!({"error": "this dashboard needs the orchestrator's token (Authorization: Bearer, or log in)"});
        Some((StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response())
    }

    /// A page at `path` with query `query`.
    pub fn page(&self, headers: &HeaderMap, path: &str, query: Option<&str>) -> Verdict {
        let (token, rest) = split_token(query.unwrap_or(""));
        if let Some(token) = token {
            let target = if rest.is_empty() { path.to_string() } else { format!("{path}?{rest}") };
            return if self.expected.is_none() || self.is(token.as_bytes()) {
                Verdict::Respond(self.logged_in(&target))
            } else {
                Verdict::Respond(login_page(&target, "That token is not this orchestrator's."))
            };
        }
        if self.carries(headers) {
            Verdict::Allowed
        } else {
            let target = match query {
                Some(q) if !q.is_empty() => format!("{path}?{q}"),
                _ => path.to_string(),
            };
            Verdict::Respond(login_page(&target, ""))
        }
    }

    /// The login form's post.
    pub fn login(&self, form: &LoginForm) -> Response {
        // Only a path on this server (not `//host`), so the form cannot send anyone elsewhere.
        let next = if form.next.starts_with('/') && !form.next.starts_with("//") { form.next.as_str() } else { "/" };
        if self.expected.is_none() || self.is(form.token.as_bytes()) {
            self.logged_in(next)
        } else {
            login_page(next, "That token is not this orchestrator's.")
        }
    }

    /// A redirect to `target` that sets the cookie.
    fn logged_in(&self, target: &str) -> Response {
        let token = self.expected.as_deref().unwrap_or_default();
        let secure = if self.secure { "; Secure" } else { "" };
        let cookie = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", hex(token));
        (StatusCode::SEE_OTHER, [(header::LOCATION, target.to_string()), (header::SET_COOKIE, cookie)]).into_response()
    }
}

/// The `token` parameter of a query string, and the query without it.
fn split_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("token", v)) => token = Some(decode(v)),
            _ => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

/// The value of the dashboard's cookie.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Percent-decoding of a query value (`+` is a space).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, b[i]) {
            (Some(x), _) => {
                out.push(x);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path segment, percent-encoded where it is not unreserved.
pub fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// 401 with a form that posts the token to `/login`, then goes to `next`.
fn login_page(next: &str, problem: &str) -> Response {
    let problem = if problem.is_empty() { String::new() } else { format!("<p class=\"problem\">{}</p>", escape_html(problem)) };
    let html = crate::assets::LOGIN_HTML.replace("{{next}}", &escape_html(next)).replace("{{problem}}", &problem);
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, crate::CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (StatusCode::UNAUTHORIZED, headers, html).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, v.parse().unwrap());
        h
    }

    #[test]
    fn tokens_come_from_the_header_or_the_cookie() {
        let a = Auth::new(Some("s3 cret"), false);
        assert!(a.api(&HeaderMap::new()).is_some());
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer s3 cret".parse().unwrap());
        assert!(a.api(&h).is_none());
        assert!(a.api(&with_cookie(&format!("other=1; sluice_token={}", hex(b"s3 cret")))).is_none());
        assert!(a.api(&with_cookie(&format!("sluice_token={}", hex(b"guess")))).is_some());
        assert!(a.api(&with_cookie("sluice_token=zz")).is_some());
        assert!(Auth::new(None, false).api(&HeaderMap::new()).is_none());
    }

    #[test]
    fn a_token_in_the_query_becomes_a_cookie_and_leaves_the_address() {
        let a = Auth::new(Some("s3 cret"), true);
        let Verdict::Respond(r) = a.page(&HeaderMap::new(), "/jobs/a-1", Some("x=1&token=s3%20cret")) else { panic!("a redirect") };
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/jobs/a-1?x=1");
        let set = r.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(set.starts_with(&format!("sluice_token={}", hex(b"s3 cret"))) && set.contains("HttpOnly") && set.contains("Secure"), "{set}");
        let Verdict::Respond(r) = a.page(&HeaderMap::new(), "/", Some("token=nope")) else { panic!("refused") };
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let Verdict::Respond(r) = a.page(&HeaderMap::new(), "/", None) else { panic!("refused") };
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("frame-ancestors 'none'"), "the login form cannot be framed");
        assert!(matches!(a.page(&with_cookie(&format!("sluice_token={}", hex(b"s3 cret"))), "/", None), Verdict::Allowed));
    }

    #[test]
    fn login_goes_only_to_this_server() {
        let a = Auth::new(Some("t"), false);
        let ok = a.login(&LoginForm { token: "t".into(), next: "//evil.example/".into() });
        assert_eq!((ok.status(), ok.headers()[header::LOCATION].to_str().unwrap()), (StatusCode::SEE_OTHER, "/"));
        let ok = a.login(&LoginForm { token: "t".into(), next: "/jobs/x".into() });
        assert_eq!(ok.headers()[header::LOCATION], "/jobs/x");
        assert_eq!(a.login(&LoginForm { token: "u".into(), next: "/".into() }).status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(decode("a%20b+c%2"), "a b c%2");
        assert_eq!(split_token("token=x%26y&b=2"), (Some("x&y".to_string()), "b=2".to_string()));
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
