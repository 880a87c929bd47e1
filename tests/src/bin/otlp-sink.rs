//! A standalone OTLP/gRPC trace collector for benchmarks: it accepts every
//! export, keeps nothing but counts, and prints them as one JSON line
//! (spans per service, export calls) when it is told to stop (SIGTERM or
//! Ctrl-C). The cost of exporting traces is measured against it, so what
//! is measured is the services' side: the collector does no work a real
//! one would charge to them.
//!
//!   otlp-sink --listen 127.0.0.1:4317

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// Accepts OTLP/gRPC trace exports and counts them.
#[derive(Debug, Parser)]
#[command(name = "otlp-sink", version)]
struct Args {
    /// Address to accept OTLP/gRPC exports on.
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
}

#[derive(Debug, Default)]
struct Counts {
    exports: u64,
    spans: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
struct Sink {
    counts: Arc<Mutex<Counts>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.exports += 1;
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let spans: usize = resource_spans
                .scope_spans
                .iter()
                .map(|s| s.spans.len())
                .sum();
            *counts.spans.entry(service).or_default() += spans as u64;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "otlp-sink: accepting OTLP/gRPC on {}",
        listener.local_addr()?
    );
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await?;
    let counts = sink.counts.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{}",
        serde_json::json!({
            "exports": counts.exports,
            "spans": counts.spans,
            "total_spans": counts.spans.values().sum::<u64>(),
        })
    );
    Ok(())
}
