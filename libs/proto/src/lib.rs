//! agentgate's gRPC contracts, generated from `proto/` at build time.
//!
//! One crate holds all generated code so that every service and proxy speaks exactly the
//! same version of each message. Packages map to modules: `agentgate.audit.v1` is
//! [`audit::v1`], and so on.

#![allow(clippy::all, missing_docs)]

pub mod common {
    pub mod v1 {
        tonic::include_proto!("agentgate.common.v1");
    }
}

pub mod audit {
    pub mod v1 {
        tonic::include_proto!("agentgate.audit.v1");
    }
}

pub mod authz {
    pub mod v1 {
        tonic::include_proto!("agentgate.authz.v1");
    }
}

pub mod approvals {
    pub mod v1 {
        tonic::include_proto!("agentgate.approvals.v1");
    }
}

pub use prost_types::{Duration, Timestamp};
