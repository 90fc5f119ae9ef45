//! `obd tcmu` on the host: the kernel probe must say plainly what is
//! missing, and the daemon must refuse to idle on a kernel without TCMU.
//! (Serving real devices is tested in a VM: tests/vm/tcmu/.)

mod obd_cli;
use obd_cli::obd;
use std::path::Path;

fn tcmu_present() -> bool {
    Path::new("/sys/module/target_core_user").exists()
        && std::fs::read_to_string("/proc/mounts").is_ok_and(|m| m.contains(" configfs "))
}

#[test]
fn check_reports_every_front_end() {
    let out = obd(&["tcmu", "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for what in ["ublk_drv", "target_core_user", "tcm_loop", "configfs"] {
        assert!(text.contains(what), "no line for {what}:\n{text}");
    }
    if tcmu_present() {
        assert!(out.status.success(), "{text}");
    } else {
        assert!(!out.status.success());
        assert!(
            text.contains("TCMU is not available on this kernel: "),
            "{text}"
        );
    }
    if !Path::new("/dev/ublk-control").exists() {
        assert!(
            text.contains("ublk is not available on this kernel"),
            "{text}"
        );
    }
}

#[test]
fn daemon_refuses_a_kernel_without_tcmu() {
    if tcmu_present() {
        return; // the daemon would run forever; the VM test covers it
    }
    let out = obd(&["tcmu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "TCMU is not available on this kernel: the target_core_user module is not loaded"
        ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one plain sentence: {err}");
}

#[test]
fn help_teaches_with_examples() {
    let out = obd(&["tcmu", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("dev_config=overlaybd/"), "{text}");
    assert!(text.contains("obd tcmu --check"), "{text}");
}
