//! Judges a raw reply: well-formed HTTP/1.1 that closes the connection, with a JSON body of
//! exactly `Content-Length` bytes, and the `{"error", "causes"}` shape on every error.

/// A reply that passed the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Final status (after any `100 Continue`).
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Parsed body (`Null` for 204).
    pub json: serde_json::Value,
}

impl Reply {
    /// A header's value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What is wrong with a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// No bytes at all.
    #[error("empty reply")]
    Empty,
    /// The head does not parse or never ends.
    #[error("bad status line or headers: {0}")]
    Head(String),
    /// A required header is missing or wrong.
    #[error("header: {0}")]
    Header(String),
    /// Body length differs from `Content-Length`.
    #[error("Content-Length says {declared} but {actual} bytes followed")]
    Length {
        /// Declared.
        declared: usize,
        /// Received.
        actual: usize,
    },
    /// The body is not JSON.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// An error body without a string `error` and a string-array `causes`.
    #[error("error body lacks \"error\"/\"causes\": {0}")]
    ErrorShape(String),
}

/// Checks `raw`, the whole byte stream the server sent.
pub fn check_reply(raw: &[u8]) -> Result<Reply, CheckError> {
    check_reply_to(raw, false)
}

/// Checks `raw` as the reply to a `HEAD` request when `head_request`: the same head, no body.
pub fn check_reply_to(raw: &[u8], head_request: bool) -> Result<Reply, CheckError> {
    if raw.is_empty() {
        return Err(CheckError::Empty);
    }
    let mut rest = raw;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let used = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(CheckError::Head("incomplete".into())),
            Err(e) => return Err(CheckError::Head(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        if resp.version != Some(1) {
            return Err(CheckError::Head("not HTTP/1.1".into()));
        }
        if resp.reason.is_none_or(str::is_empty) {
            return Err(CheckError::Head("no reason phrase".into()));
        }
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        rest = rest.get(used..).unwrap_or_default();
        if status == 100 {
            continue;
        }
        if !(200..=599).contains(&status) {
            return Err(CheckError::Head(format!("status {status}")));
        }
        return check_final(status, headers, rest, head_request);
    }
}

fn check_final(
    status: u16,
    headers: Vec<(String, String)>,
    body: &[u8],
    head_request: bool,
) -> Result<Reply, CheckError> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if !get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        return Err(CheckError::Header("no Connection: close".into()));
    }
    if status == 405 && get("allow").is_none_or(str::is_empty) {
        return Err(CheckError::Header("405 without Allow".into()));
    }
    if status == 204 {
        if !body.is_empty() || get("content-length").is_some() {
            return Err(CheckError::Header(
                "204 with a body or Content-Length".into(),
            ));
        }
        return Ok(Reply {
            status,
            headers,
            json: serde_json::Value::Null,
        });
    }
    if get("content-type") != Some("application/json") {
        return Err(CheckError::Header(
            "Content-Type is not application/json".into(),
        ));
    }
    let declared = get("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| CheckError::Header("no valid Content-Length".into()))?;
    if head_request {
        if !body.is_empty() {
            return Err(CheckError::Length {
                declared: 0,
                actual: body.len(),
            });
        }
        return Ok(Reply {
            status,
            headers,
            json: serde_json::Value::Null,
        });
    }
    if declared != body.len() {
        return Err(CheckError::Length {
            declared,
            actual: body.len(),
        });
    }
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| CheckError::NotJson(e.to_string()))?;
    if status >= 400 {
        let error_ok = json
            .get("error")
            .and_then(|e| e.as_str())
            .is_some_and(|e| !e.is_empty());
        let causes_ok = json
            .get("causes")
            .and_then(|c| c.as_array())
            .is_some_and(|c| c.iter().all(|x| x.is_string()));
        if !error_ok || !causes_ok {
            return Err(CheckError::ErrorShape(json.to_string()));
        }
    }
    Ok(Reply {
        status,
        headers,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::response::Response;
    use crate::ApiError;

    #[test]
    fn accepts_what_the_server_sends() {
        let r = check_reply(&Response::no_content().to_bytes()).unwrap();
        assert_eq!(r.status, 204);
        let e = Response::error(&ApiError {
            status: 409,
            error: "busy".into(),
            causes: vec!["x".into()],
        });
        assert_eq!(check_reply(&e.to_bytes()).unwrap().status, 409);
        let mut two = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        two.extend(Response::json(&serde_json::json!({"a": 1})).to_bytes());
        assert_eq!(check_reply(&two).unwrap().json["a"], 1);
    }

    #[test]
    fn rejects_broken_replies() {
        let ok = Response::error_msg(400, "x").to_bytes();
        assert_eq!(check_reply(b""), Err(CheckError::Empty));
        assert!(matches!(
            check_reply(&ok[..ok.len() - 1]),
            Err(CheckError::Length { .. })
        ));
        let mut extra = ok.clone();
        extra.push(b'x');
        assert!(matches!(
            check_reply(&extra),
            Err(CheckError::Length { .. })
        ));
        let text = String::from_utf8(ok).unwrap();
        let bad_shape = text.replace(
            r#"{"error":"x","causes":[]}"#,
            r#"{"errox":"x","causes":[]}"#,
        );
        assert!(matches!(
            check_reply(bad_shape.as_bytes()),
            Err(CheckError::ErrorShape(_))
        ));
        let no_close = text.replace("Connection: close\r\n", "");
        assert!(matches!(
            check_reply(no_close.as_bytes()),
            Err(CheckError::Header(_))
        ));
        assert!(matches!(
            check_reply(b"HTTP/1.1 200 OK\r\n"),
            Err(CheckError::Head(_))
        ));
        let head = Response::error_msg(405, "x").with_header("Allow", "GET");
        assert!(check_reply_to(&head.to_head_bytes(), true).is_ok());
        assert!(check_reply_to(&head.to_bytes(), true).is_err());
        let no_allow = Response::error_msg(405, "x").to_bytes();
        assert!(matches!(check_reply(&no_allow), Err(CheckError::Header(_))));
    }
}
