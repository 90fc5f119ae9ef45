//! Which kernel front ends this host offers, in plain words.
//!
//! ublk needs `/dev/ublk-control` (ublk_drv). TCMU needs target_core_user
//! and configfs mounted at /sys/kernel/config; the snapshotter also needs
//! tcm_loop to turn a TCMU device into a local /dev/sdX. Everything is
//! read from sysfs/procfs under a root directory, so tests can fake it.

use std::fs;
use std::path::Path;

/// What the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub ublk: bool,
    pub target_core_user: bool,
    pub tcm_loop: bool,
    pub configfs: bool,
}

/// Probe the running kernel.
pub fn probe() -> Probe {
    probe_at(Path::new("/"))
}

/// Probe with every path under `root`.
pub fn probe_at(root: &Path) -> Probe {
    let module = |name: &str| {
        root.join("sys/module").join(name).exists()
            || fs::read_to_string(root.join("proc/modules"))
                .is_ok_and(|m| m.lines().any(|l| l.split(' ').next() == Some(name)))
    };
    let configfs = fs::read_to_string(root.join("proc/mounts"))
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(2) == Some("configfs")));
    Probe {
        ublk: root.join("dev/ublk-control").exists(),
        target_core_user: module("target_core_user"),
        tcm_loop: module("tcm_loop"),
        configfs,
    }
}

impl Probe {
    /// Why TCMU cannot work here, as one sentence; `None` when it can.
    pub fn tcmu_problem(&self) -> Option<String> {
        let mut missing = Vec::new();
        if !self.target_core_user {
            missing.push("the target_core_user module is not loaded (modprobe target_core_user)");
        }
        if !self.configfs {
            missing.push("configfs is not mounted (mount -t configfs none /sys/kernel/config)");
        }
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "TCMU is not available on this kernel: {}.",
            missing.join(", and ")
        ))
    }

    /// One line per front end, for `obd tcmu --check`.
    pub fn report(&self) -> Vec<String> {
        let yes_no = |b: bool| if b { "available" } else { "missing" };
        let mut lines = vec![
            format!("ublk_drv (/dev/ublk-control): {}", yes_no(self.ublk)),
            format!("target_core_user: {}", yes_no(self.target_core_user)),
            format!("tcm_loop: {}", yes_no(self.tcm_loop)),
            format!("configfs (/sys/kernel/config): {}", yes_no(self.configfs)),
        ];
        lines.push(match self.tcmu_problem() {
            Some(problem) => problem,
            None if !self.tcm_loop => "TCMU works here, but without tcm_loop (modprobe tcm_loop) \
                the snapshotter cannot make local /dev/sdX devices."
                .into(),
            None => "TCMU works here.".into(),
        });
        if !self.ublk {
            lines.push("ublk is not available on this kernel: /dev/ublk-control is missing (modprobe ublk_drv).".into());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_available() {
        let root = std::env::temp_dir().join(format!("obd-probe-none-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let p = probe_at(&root);
        assert_eq!(
            p,
            Probe {
                ublk: false,
                target_core_user: false,
                tcm_loop: false,
                configfs: false
            }
        );
        let problem = p.tcmu_problem().unwrap();
        assert!(
            problem.contains("target_core_user") && problem.contains("configfs"),
            "{problem}"
        );
        assert!(p
            .report()
            .iter()
            .any(|l| l.contains("ublk is not available")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn everything_available() {
        let root = std::env::temp_dir().join(format!("obd-probe-all-{}", std::process::id()));
        fs::create_dir_all(root.join("sys/module/target_core_user")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        fs::write(root.join("dev/ublk-control"), "").unwrap();
        fs::write(root.join("proc/modules"), "tcm_loop 36864 0 - Live 0x0\n").unwrap();
        fs::write(
            root.join("proc/mounts"),
            "configfs /sys/kernel/config configfs rw 0 0\n",
        )
        .unwrap();
        let p = probe_at(&root);
        assert!(p.ublk && p.target_core_user && p.tcm_loop && p.configfs);
        assert_eq!(p.tcmu_problem(), None);
        assert_eq!(p.report().last().unwrap(), "TCMU works here.");
        fs::remove_dir_all(&root).unwrap();
    }
}
