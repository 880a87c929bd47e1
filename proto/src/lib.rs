//! Generated gRPC code for every package of the saga system, and the encoded
//! file descriptor set that servers register for reflection.
//!
//! The modules mirror the protobuf packages: `saga::v1` (the orchestrator's
//! OrderService and AdminService), `inventory::v1`, `payment::v1`,
//! `fulfillment::v1` (the participants), `fault::v1` (fault injection) and
//! `google::rpc` (status codes).

#![allow(unreachable_pub, clippy::all)]

/// The orchestrator's API.
pub mod saga {
    pub mod v1 {
        tonic::include_proto!("saga.v1");
    }
}

/// The inventory participant.
pub mod inventory {
    pub mod v1 {
        tonic::include_proto!("inventory.v1");
    }
}

/// The payment participant.
pub mod payment {
    pub mod v1 {
        tonic::include_proto!("payment.v1");
    }
}

/// The fulfillment participant.
pub mod fulfillment {
    pub mod v1 {
        tonic::include_proto!("fulfillment.v1");
    }
}

/// Fault injection on participants.
pub mod fault {
    pub mod v1 {
        tonic::include_proto!("fault.v1");
    }
}

/// Canonical gRPC status codes.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Encoded descriptors of every package above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_descriptor");
