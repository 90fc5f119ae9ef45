//! `obd`: overlaybd images from the command line.
//!
//! The subcommands mirror the reference tools (`overlaybd-create`,
//! `overlaybd-commit`, `overlaybd-zfile`...) so users can switch, and add
//! `export`, `import` and `info` for working with images without a kernel.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod progress;

#[derive(Parser)]
#[command(
    name = "obd",
    version,
    about = "overlaybd block images: create, commit, compress, export and inspect layers",
    long_about = "overlaybd block images: an image is a stack of layer files (LSMT, optionally \
ZFile-compressed, optionally tar-wrapped) merged into one virtual block device.\n\n\
A typical flow: `obd create` a writable layer, write to it (through a device, or \
`obd import` a raw disk image instead), `obd commit` it into a read-only layer, \
then stack layers with `obd export` or a config.v1.json."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Create(cmd::create::Args),
    Commit(cmd::commit::Args),
    Zfile(cmd::zfile::Args),
    Export(cmd::export::Args),
    Import(cmd::import::Args),
    Info(cmd::info::Args),
    Trace(cmd::trace::Args),
    Push(cmd::push::Args),
    Tcmu(cmd::tcmu::Args),
    Add(cmd::add::Args),
    List(cmd::list::Args),
    Del(cmd::del::Args),
    Recover(cmd::recover::Args),
    Serve(cmd::serve::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create(args) => cmd::create::run(args),
        Command::Commit(args) => cmd::commit::run(args),
        Command::Zfile(args) => cmd::zfile::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Import(args) => cmd::import::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Trace(args) => cmd::trace::run(args),
        Command::Push(args) => cmd::push::run(args),
        Command::Tcmu(args) => cmd::tcmu::run(args),
        Command::Add(args) => cmd::add::run(args),
        Command::List(args) => cmd::list::run(args),
        Command::Del(args) => cmd::del::run(args),
        Command::Recover(args) => cmd::recover::run(args),
        Command::Serve(args) => cmd::serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("obd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
