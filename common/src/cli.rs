//! Helpers shared by the command-line entry points of the system: one-line
//! flag errors, durations on the command line, secrets (tokens) that never
//! show in a log, logging setup, and the shutdown signal.

use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Parses the command line; on a bad flag prints one line (not clap's usage
/// block) and returns the exit code to end with. `--help` and `--version`
/// print and exit as usual.
pub fn parse_args<T: clap::Parser>(program: &str) -> Result<T, ExitCode> {
    parse_args_with_matches(program).map(|(parsed, _)| parsed)
}

/// Like [`parse_args`], with clap's matches too: where each value came
/// from (`ArgMatches::value_source`: the command line, the environment or
/// a default).
pub fn parse_args_with_matches<T: clap::Parser>(
    program: &str,
) -> Result<(T, clap::ArgMatches), ExitCode> {
    let parsed = T::command()
        .try_get_matches()
        .and_then(|matches| T::from_arg_matches(&matches).map(|parsed| (parsed, matches)));
    match parsed {
        Ok(parsed) => Ok(parsed),
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            // clap's message up to its usage block, on one line.
            let rendered = error.to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{program}: {} (see {program} --help)", message.join(" "));
            Err(ExitCode::from(2))
        }
    }
}

/// A secret from a flag, an environment variable or a file (a bearer
/// token): its `Debug` never shows it, so a settings struct that holds one
/// can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends or checks it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Checks a bearer token given as `what`: not empty, and printable ASCII
/// without spaces, as it must be to travel in an `authorization` header.
pub fn check_token(what: &str, token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{what} must be printable ASCII without spaces (it travels in a header)"
        ));
    }
    Ok(())
}

/// Reads a bearer token from the file at `path` (given with `flag`): its
/// content with one trailing newline trimmed, checked by [`check_token`].
/// An unreadable or empty file is an error naming the flag and the path,
/// never the content.
pub fn read_token_file(flag: &str, path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let token = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    check_token(&format!("the token in {flag} {}", path.display()), token)?;
    Ok(Secret(token.to_owned()))
}

/// Logs to stderr, filtered by RUST_LOG (default `info`, sqlx at `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Parses "250ms", "10s", "2m", "1h", "1d" or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 250ms, 10s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(value.saturating_mul(3600))),
        "d" => Ok(Duration::from_secs(value.saturating_mul(86_400))),
        _ => Err(format!(
            "{text:?} is not a duration such as 250ms, 10s, 2m or 1h"
        )),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested; finishing calls in progress");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("ten").is_err());
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_secret_never_shows_in_debug() {
        let secret = Secret::from("hunter2");
        assert_eq!(secret.expose(), "hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(secret)).contains("hunter2"));
    }

    #[test]
    fn a_token_file_loses_one_trailing_newline_and_must_hold_a_token() {
        let dir = std::env::temp_dir().join(format!("cli-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        let read = |path: &Path| read_token_file("--token-file", path);
        assert_eq!(read(&file("lf", "s3cret\n")).unwrap().expose(), "s3cret");
        assert_eq!(
            read(&file("crlf", "s3cret\r\n")).unwrap().expose(),
            "s3cret"
        );
        assert_eq!(read(&file("bare", "s3cret")).unwrap().expose(), "s3cret");
        for (name, content, says) in [
            ("empty", "", "is empty"),
            ("newline", "\n", "is empty"),
            ("two", "s3cret\n\n", "printable ASCII"),
            ("space", "s3 cret", "printable ASCII"),
        ] {
            let error = read(&file(name, content)).unwrap_err();
            assert!(error.contains(says), "{name}: {error}");
            assert!(error.contains("--token-file"), "{name}: {error}");
            assert!(!error.contains("s3"), "the content is not echoed: {error}");
        }
        let error = read(&dir.join("missing")).unwrap_err();
        assert!(error.starts_with("cannot read --token-file"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
