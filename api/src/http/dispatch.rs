//! Turns a parsed request into a reply: route lookup, method check, body parsing, and the
//! round trip to the VMM's control loop.

use super::request::Request;
use super::response::Response;
use super::routes;
use crate::ApiSender;

/// Longest piece of a client's target echoed back in a 404, so the reply stays small.
const ECHO_MAX: usize = 200;

/// Answers one request; every outcome, good or bad, is a [`Response`].
pub fn dispatch(req: &Request, sender: &ApiSender) -> Response {
    let Some(route) = routes::find(&req.target) else {
        let shown: String = req.target.chars().take(ECHO_MAX).collect();
        return Response::error_msg(404, format!("no API endpoint at '{shown}'"));
    };
    if req.method != route.method.as_str() {
        let shown: String = req.method.chars().take(ECHO_MAX).collect();
        return Response::error_msg(
            405,
            format!(
                "{} takes {}, not {shown}",
                route.path,
                route.method.as_str()
            ),
        )
        .with_header("Allow", route.method.as_str());
    }
    let api_req = match route.action.request(&req.body) {
        Ok(r) => r,
        Err(e) => return Response::error(&e.into()),
    };
    log::debug!("API {} {}", route.method.as_str(), route.path);
    match sender.call(api_req) {
        Ok(serde_json::Value::Null) => Response::no_content(),
        Ok(value) => Response::json(&value),
        Err(e) => {
            log::info!("API {} failed: {} ({})", route.path, e.error, e.status);
            Response::error(&e)
        }
    }
}
