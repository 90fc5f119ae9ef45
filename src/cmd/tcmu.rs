//! `obd tcmu`: the TCMU backstore daemon, in place of `overlaybd-tcmu`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kmod_compat::probe;
use kmod_compat::service::{self, Options};

use super::export::load_global_config;

/// Serve overlaybd images as TCMU (target_core_user) devices, for the
/// containerd overlaybd snapshotter and anything else that creates devices
/// through configfs.
///
/// Runs until SIGTERM or SIGINT. Every TCMU device whose dev_config is
/// `overlaybd/<config path>` is served: its image config is opened (local
/// and registry lowers, optional writable upper), `success` or
/// `failed:<reason>` is written to the config's resultFile, and SCSI
/// commands are answered from the image. Devices created or removed while
/// it runs are picked up within a second; devices that exist when it
/// starts (after a restart) are served again.
///
/// Like tcmu-runner it answers target_core_user's generic netlink
/// (TCM-USER): it turns the kernel's command replies on at start, and
/// configfs writes then wait for its answers: `enable` returns once the
/// image is open, or fails (ENOENT, EINVAL) when it cannot be; removing a
/// device waits until obd has let go of it; a new `dev_size` is taken
/// when it is the size served or, for an image with a writable upper, a
/// larger one: the upper grows online and the disk reports its new
/// capacity. When it stops it turns replies off again, so devices made
/// while no daemon runs do not hang.
///
/// ublk (`obd add`) stays the default way to serve an image; use this
/// where the snapshotter is configured for TCMU.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  # Is TCMU (and ublk) usable on this kernel?
  obd tcmu --check

  # Run the daemon (systemd: kmod-compat/obd-tcmu.service)
  obd tcmu --global-config /etc/overlaybd/overlaybd.json

  # Make a device by hand, as the snapshotter does (as root):
  C=/sys/kernel/config/target
  mkdir -p $C/core/user_1/vol1
  echo -n dev_config=overlaybd//var/lib/obd/config.v1.json > $C/core/user_1/vol1/control
  echo -n dev_size=$((64<<30)) > $C/core/user_1/vol1/control
  echo 1 > $C/core/user_1/vol1/enable
  mkdir -p $C/loopback/naa.600140500000000a/tpgt_1/lun/lun_0
  echo naa.600140500000000b > $C/loopback/naa.600140500000000a/tpgt_1/nexus
  ln -s $C/core/user_1/vol1 $C/loopback/naa.600140500000000a/tpgt_1/lun/lun_0/
  cat /var/lib/obd/result   # success, or failed:<reason>; the disk is a new /dev/sdX")]
pub struct Args {
    /// Global config (cache, credentials, download, p2p) for registry
    /// layers [default: /etc/overlaybd/overlaybd.json if it exists].
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
    /// SCSI commands run at once per device (a thread each). Each answer
    /// goes back as its command finishes (in ring order when no ring
    /// journal can be kept under /run/obd/tcmu).
    #[arg(long, value_name = "N", default_value_t = service::DEFAULT_WORKERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Report which kernel front ends (ublk, TCMU, tcm_loop, configfs)
    /// this host has, then exit: 0 when TCMU works, 1 when not.
    #[arg(long)]
    check: bool,
    /// Debugging and tests: set target_core_user's kernel command reply
    /// support (as libtcmu does at start, or off) and exit.
    #[arg(long, value_name = "on|off", hide = true,
          value_parser = clap::builder::PossibleValuesParser::new(["on", "off"]))]
    netlink_reply: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let found = probe::probe();
    if args.check {
        for line in found.report() {
            println!("{line}");
        }
        return match found.tcmu_problem() {
            Some(_) => bail!("TCMU is not usable here"),
            None => Ok(()),
        };
    }
    if let Some(problem) = found.tcmu_problem() {
        bail!("{problem}");
    }
    if let Some(value) = args.netlink_reply {
        let on = value == "on";
        let supported = kmod_compat::netlink::set_reply_support(on)
            .context("TCMU_CMD_SET_FEATURES over generic netlink")?;
        if !supported {
            bail!("this kernel takes no TCMU command reply support");
        }
        println!("target_core_user: kernel command reply support {value}");
        return Ok(());
    }
    // Before any other thread starts, so that all of them leave the
    // signals to the one that waits for them.
    let stop = catch_stop_signals()?;
    let global = load_global_config(args.global_config.as_deref())?;
    if let Some(path) = &global.log_config.log_path {
        eprintln!("obd tcmu: logging to {} (logConfig)", path.display());
    }
    crate::daemon_log::start(&global.log_config)?;
    crate::daemon_log::name_ignored_keys("obd tcmu", &global);
    crate::daemon_log::start_audit("obd tcmu", &global)?;
    eprintln!("obd tcmu: serving overlaybd TCMU devices (dev_config=overlaybd/<config path>)");
    let trace_global = global.clone();
    let on_open: kmod_compat::service::OnOpen = Arc::new(move |stack, config| {
        Box::new(TraceGuard(Some(super::ublk::start_trace_for(
            config,
            &trace_global,
            stack,
        ))))
    });
    let metrics = Arc::new(kmod_compat::metrics::Metrics::default());
    if global.exporter_config.enable {
        crate::metrics_http::start(&global.exporter_config, metrics.clone())?;
        eprintln!(
            "obd tcmu: metrics at http://0.0.0.0:{}{} (exporterConfig)",
            global.exporter_config.port, global.exporter_config.uri_prefix
        );
    }
    let options = Options {
        workers: usize::from(args.workers),
        on_open: Some(on_open),
        metrics: Some(metrics),
        ..Options::new(global)
    };
    service::run(options, &stop);
    eprintln!("obd tcmu: stopped");
    Ok(())
}

/// SIGINT and SIGTERM are blocked in every thread (this one and all it
/// starts afterwards) and taken by one thread with sigwait, which asks the
/// service to stop: it then turns netlink replies off and lets go of its
/// devices (no work in a signal handler). A second signal exits at once.
fn catch_stop_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    crate::stop_signals::on_stop_signals(move |signal| {
        if flag.swap(true, Ordering::Relaxed) {
            eprintln!("obd tcmu: signal {signal} again: exiting at once");
            std::process::exit(1);
        }
        eprintln!("obd tcmu: signal {signal}: stopping");
    })?;
    Ok(stop)
}

/// A device's trace session (`recordTracePath`: record when the file is
/// empty, else replay as prefetch), finished when the device goes: a
/// recording then writes its trace and `.ok` file, as under `obd add`.
struct TraceGuard(Option<trace_tools::Session>);

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            super::ublk::finish_trace(session);
        }
    }
}
