//! The route table: every endpoint's path, method and the [`ApiRequest`] it becomes.
//!
//! The dispatcher, `colovmm-remote`, the fuzz generator and the OpenAPI test all read
//! [`ROUTES`], so a route exists in exactly one place.

use crate::config::ConfigError;
use crate::{ApiError, ApiRequest, VmConfig};

/// Every route lives under this prefix (Cloud Hypervisor's).
pub const API_PREFIX: &str = "/api/v1";

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Reads state.
    Get,
    /// Changes state.
    Put,
}

impl Method {
    /// The method as it appears on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a route asks of the control loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `vmm.ping`.
    VmmPing,
    /// `vmm.shutdown`.
    VmmShutdown,
    /// `vm.create` (the body is a [`VmConfig`]).
    VmCreate,
    /// `vm.boot`.
    VmBoot,
    /// `vm.pause`.
    VmPause,
    /// `vm.resume`.
    VmResume,
    /// `vm.shutdown`.
    VmShutdown,
    /// `vm.reboot`.
    VmReboot,
    /// `vm.info`.
    VmInfo,
    /// `vm.counters`.
    VmCounters,
}

/// One endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Full path, e.g. `/api/v1/vm.boot`.
    pub path: &'static str,
    /// The one method it accepts.
    pub method: Method,
    /// What it asks of the control loop.
    pub action: Action,
}

/// Every endpoint the server answers.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/api/v1/vmm.ping",
        method: Method::Get,
        action: Action::VmmPing,
    },
    Route {
        path: "/api/v1/vmm.shutdown",
        method: Method::Put,
        action: Action::VmmShutdown,
    },
    Route {
        path: "/api/v1/vm.create",
        method: Method::Put,
        action: Action::VmCreate,
    },
    Route {
        path: "/api/v1/vm.boot",
        method: Method::Put,
        action: Action::VmBoot,
    },
    Route {
        path: "/api/v1/vm.pause",
        method: Method::Put,
        action: Action::VmPause,
    },
    Route {
        path: "/api/v1/vm.resume",
        method: Method::Put,
        action: Action::VmResume,
    },
    Route {
        path: "/api/v1/vm.shutdown",
        method: Method::Put,
        action: Action::VmShutdown,
    },
    Route {
        path: "/api/v1/vm.reboot",
        method: Method::Put,
        action: Action::VmReboot,
    },
    Route {
        path: "/api/v1/vm.info",
        method: Method::Get,
        action: Action::VmInfo,
    },
    Route {
        path: "/api/v1/vm.counters",
        method: Method::Get,
        action: Action::VmCounters,
    },
];

/// Why a request body was refused (always a 400).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, not a `VmConfig`, or a field the config does not know.
    #[error("invalid VmConfig JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Well-formed but refused by `VmConfig::validate()`.
    #[error("invalid VmConfig: {0}")]
    Invalid(#[from] ConfigError),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        ApiError::new(400, e.to_string())
    }
}

impl Action {
    /// The route that carries this action.
    pub fn route(self) -> &'static Route {
        // Every action has exactly one route; the table test checks it, and the fallback
        // keeps this total without a panic path.
        ROUTES
            .iter()
            .find(|r| r.action == self)
            .unwrap_or(&ROUTES[0])
    }

    /// Builds the control-loop request, parsing and validating `body` where the route takes one.
    pub fn request(self, body: &[u8]) -> Result<ApiRequest, BodyError> {
        Ok(match self {
            Action::VmmPing => ApiRequest::VmmPing,
            Action::VmmShutdown => ApiRequest::VmmShutdown,
            Action::VmCreate => {
                let config: VmConfig = serde_json::from_slice(body)?;
                config.validate()?;
                ApiRequest::VmCreate(Box::new(config))
            }
            Action::VmBoot => ApiRequest::VmBoot,
            Action::VmPause => ApiRequest::VmPause,
            Action::VmResume => ApiRequest::VmResume,
            Action::VmShutdown => ApiRequest::VmShutdown,
            Action::VmReboot => ApiRequest::VmReboot,
            Action::VmInfo => ApiRequest::VmInfo,
            Action::VmCounters => ApiRequest::VmCounters,
        })
    }
}

/// Strips a query string and an `http://host` prefix (absolute-form targets) from a target.
pub fn normalize_target(target: &str) -> &str {
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    target.split(['?', '#']).next().unwrap_or(target)
}

/// The route for a request target, whatever the method.
pub fn find(target: &str) -> Option<&'static Route> {
    let path = normalize_target(target);
    ROUTES.iter().find(|r| r.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(r.path.starts_with(API_PREFIX), "{}", r.path);
            assert_eq!(r.action.route(), r, "each action has one route");
            assert!(
                ROUTES[..i].iter().all(|o| o.path != r.path),
                "duplicate {}",
                r.path
            );
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            find("/api/v1/vm.info").map(|r| r.action),
            Some(Action::VmInfo)
        );
        assert_eq!(
            find("/api/v1/vm.info?x=1").map(|r| r.action),
            Some(Action::VmInfo)
        );
        assert_eq!(
            find("http://localhost/api/v1/vm.boot").map(|r| r.action),
            Some(Action::VmBoot)
        );
        assert!(find("/api/v1/vm.info/").is_none());
        assert!(find("/api/v1/").is_none());
        assert!(find("http://localhost").is_none());
    }

    #[test]
    fn create_body() {
        assert!(matches!(
            Action::VmCreate.request(br#"{"payload":{"kernel":"/k"}}"#),
            Ok(ApiRequest::VmCreate(_))
        ));
        let e = Action::VmCreate.request(b"{").unwrap_err();
        assert!(e.to_string().starts_with("invalid VmConfig JSON"), "{e}");
        let e = Action::VmCreate
            .request(br#"{"payload":{"kernel":"/k"},"bogus":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Action::VmCreate
            .request(br#"{"payload":{"kernel":"/k"},"memory":{"size":0}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        assert_eq!(
            Action::VmBoot.request(b"ignored").ok(),
            Some(ApiRequest::VmBoot)
        );
    }
}
