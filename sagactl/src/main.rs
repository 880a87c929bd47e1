//! `sagactl`: the operator's CLI. Parses flags and calls the library.

use std::io::Write;
use std::process::ExitCode;

use sagactl::{Cli, run};

fn main() -> ExitCode {
    let cli: Cli = match common::cli::parse_args("sagactl") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sagactl: cannot start the async runtime: {error}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(done) => {
            let _ = std::io::stdout().write_all(done.stdout.as_bytes());
            ExitCode::from(done.code)
        }
        Err(failure) => {
            eprintln!("sagactl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
