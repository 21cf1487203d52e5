//! The `secretgate` binary: parse the command line, run it.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the glibc allocator took about 15% of the gateway's CPU under load. Built in its
/// secure mode (level 4: guard pages around its metadata, randomized addresses, encoded free
/// lists, double-free checks), which cost no measurable throughput here (README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    secretgate::run_cli(secretgate::Cli::parse())
}
