//! The HTTP probe and metrics endpoint (`--http-listen`): `GET /healthz`
//! answers 200 while serving and 503 while stopping; `GET /metrics` answers
//! Prometheus text. HTTP/1.0-style, one request per connection: a few lines
//! instead of an HTTP framework. Accept errors are backed off and logged at
//! most once a second (`common::listen`), and a connection whose
//! request has not arrived within the idle timeout is closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::executor::Executor;

/// Serves probes and metrics until the executor stops; a connection whose
/// request has not arrived within `idle` is closed unanswered.
pub async fn serve_http(listener: TcpListener, executor: Arc<Executor>, idle: Duration) {
    let mut stopping = executor.stopping();
    let mut acceptor = common::listen::Acceptor::new(listener, "http");
    loop {
        let stream = tokio::select! {
            stream = acceptor.accept() => stream,
            _ = crate::executor::stopped(&mut stopping) => return,
        };
        let executor = executor.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &executor, idle).await {
                tracing::debug!(%error, "http request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, executor: &Executor, idle: Duration) -> std::io::Result<()> {
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(idle, stream.read(&mut buffer))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the idle timeout",
            )
        })??;
    let request = String::from_utf8_lossy(&buffer[..read]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match path {
        "/healthz" if *executor.stopping().borrow() => {
            ("503 Service Unavailable", "stopping\n".to_owned())
        }
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/metrics" => ("200 OK", metrics(executor).await),
        _ => ("404 Not Found", "try /healthz or /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn metrics(executor: &Executor) -> String {
    let mut text = format!(
        "# HELP saga_in_flight Sagas driven by this replica now.\n# TYPE saga_in_flight gauge\nsaga_in_flight {}\n\
         # HELP saga_max_in_flight The in-flight bound.\n# TYPE saga_max_in_flight gauge\nsaga_max_in_flight {}\n",
        executor.in_flight(),
        executor.config().max_in_flight
    );
    if let Ok(stats) = executor.store().stats().await {
        text.push_str(
            "# HELP saga_sagas Sagas per status, all replicas.\n# TYPE saga_sagas gauge\n",
        );
        for (status, count) in stats.counts {
            text.push_str(&format!("saga_sagas{{status=\"{status}\"}} {count}\n"));
        }
        text.push_str(&format!(
            "# TYPE saga_started_last_minute gauge\nsaga_started_last_minute {}\n\
             # TYPE saga_finished_last_minute gauge\nsaga_finished_last_minute {}\n",
            stats.started_last_minute, stats.finished_last_minute
        ));
    }
    text
}
