//! `obd`: overlaybd images from the command line.
//!
//! The subcommands mirror the reference tools (`overlaybd-create`,
//! `overlaybd-commit`, `overlaybd-zfile`...) so users can switch, and add
//! `export`, `import` and `info` for working with images without a kernel.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod daemon_log;
mod metrics_http;
mod progress;
mod snapshot_socket;
mod stop_signals;

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
    Apply(cmd::apply::Args),
    Convert(cmd::convert::Args),
    Info(cmd::info::Args),
    Trace(cmd::trace::Args),
    Push(cmd::push::Args),
    Tcmu(cmd::tcmu::Args),
    Add(cmd::add::Args),
    List(cmd::list::Args),
    Del(cmd::del::Args),
    Recover(cmd::recover::Args),
    Snapshot(cmd::snapshot::Args),
    Resize(cmd::resize::Args),
    Serve(cmd::serve::Args),
}

/// The reference tools obd stands in for when installed (or linked) under
/// their names, e.g. /opt/overlaybd/bin/overlaybd-create → obd: the
/// containerd snapshotter runs them by those paths with their arguments,
/// which the matching subcommands accept.
const REFERENCE_TOOLS: [(&str, &str); 4] = [
    ("overlaybd-create", "create"),
    ("overlaybd-commit", "commit"),
    ("overlaybd-zfile", "zfile"),
    ("overlaybd-tcmu", "tcmu"),
];

/// The command line, with the subcommand put in when obd was run under a
/// reference tool's name.
fn command_line() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if let Some((_, sub)) = REFERENCE_TOOLS.iter().find(|(tool, _)| *tool == name) {
        args.insert(1, (*sub).into());
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(command_line());
    if matches!(
        cli.command,
        Command::Info(_) | Command::List(_) | Command::Trace(_)
    ) {
        // Commands that print a lot end quietly when their reader goes away
        // (`obd info LAYER | head`), as Unix tools do, instead of failing
        // on the next print. (Not the daemons and network commands: a
        // peer closing a socket must not kill them.)
        // SAFETY: before any thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Create(args) => cmd::create::run(args),
        Command::Commit(args) => cmd::commit::run(args),
        Command::Zfile(args) => cmd::zfile::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Import(args) => cmd::import::run(args),
        Command::Apply(args) => cmd::apply::run(args),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Trace(args) => cmd::trace::run(args),
        Command::Push(args) => cmd::push::run(args),
        Command::Tcmu(args) => cmd::tcmu::run(args),
        Command::Add(args) => cmd::add::run(args),
        Command::List(args) => cmd::list::run(args),
        Command::Del(args) => cmd::del::run(args),
        Command::Recover(args) => cmd::recover::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
        Command::Resize(args) => cmd::resize::run(args),
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
