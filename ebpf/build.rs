//! Compile the C probes in bpf/ to BPF bytecode with clang (clang-16 from
//! Debian 12, or $CLANG), with libbpf's headers (libbpf-dev).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=bpf/obd_trace.bpf.c");
    println!("cargo:rerun-if-changed=bpf/obd_trace.h");
    println!("cargo:rerun-if-env-changed=CLANG");
    let candidates: Vec<String> = match std::env::var("CLANG") {
        Ok(clang) => vec![clang],
        Err(_) => vec!["clang-16".into(), "clang".into()],
    };
    let object = out.join("obd_trace.bpf.o");
    for clang in &candidates {
        let status = Command::new(clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .args(["-I", "/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg("bpf/obd_trace.bpf.c")
            .arg("-o")
            .arg(&object)
            .status();
        match status {
            Ok(s) if s.success() => return,
            Ok(s) => panic!("{clang} failed to compile bpf/obd_trace.bpf.c ({s})"),
            Err(_) => continue,
        }
    }
    panic!(
        "no clang found (tried {}): install clang-16 and libbpf-dev \
         (apt-get install clang-16 libbpf-dev), or set CLANG",
        candidates.join(", ")
    );
}
