//! The `secretgate` binary: parse the command line, run it.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    secretgate::run_cli(secretgate::Cli::parse())
}
