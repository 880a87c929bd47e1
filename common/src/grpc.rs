//! What every gRPC server of the system registers beside its own services:
//! `grpc.health.v1.Health`, and server reflection in both versions (v1, and
//! v1alpha for grpcurl 1.8, which speaks only that) over every package of
//! the system and the health service.

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_reflection::server::{Builder, v1, v1alpha};

use crate::error::Error;

/// The health service, with each of `services` marked serving.
pub async fn health(services: &[&str]) -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, server) = tonic_health::server::health_reporter();
    set_health(&reporter, services, ServingStatus::Serving).await;
    (reporter, server)
}

/// Marks each of `services` with `status` (`NotServing` when stopping).
pub async fn set_health(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}

/// Reflection v1, advertising `services` and itself.
pub fn reflection_v1(
    services: &[&str],
) -> Result<v1::ServerReflectionServer<impl v1::ServerReflection>, Error> {
    reflection(services)
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(|e| Error::invalid(format!("reflection: {e}")))
}

/// Reflection v1alpha, advertising `services` and itself.
pub fn reflection_v1alpha(
    services: &[&str],
) -> Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, Error> {
    reflection(services)
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(|e| Error::invalid(format!("reflection: {e}")))
}

fn reflection(services: &[&str]) -> Builder<'static> {
    services.iter().fold(
        Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(*name),
    )
}
