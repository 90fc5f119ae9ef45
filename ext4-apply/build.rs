//! Rust declarations for libext2fs (e2fsprogs), generated from the
//! installed headers so struct layouts (the superblock, inodes, the
//! io_manager table) always match the library that is linked.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ext2fs.h");
    println!("cargo:rustc-link-lib=ext2fs");
    println!("cargo:rustc-link-lib=com_err");
    let bindings = bindgen::Builder::default()
        .header("src/ext2fs.h")
        .allowlist_function("ext2fs_.*")
        .allowlist_function("io_channel_.*")
        .allowlist_function("initialize_ext2_error_table")
        .allowlist_function("error_message")
        .allowlist_type("struct_io_manager")
        .allowlist_type("struct_io_channel")
        .allowlist_type("ext2_inode_large")
        .allowlist_type("ext2_super_block")
        .allowlist_var("EXT2_.*")
        .allowlist_var("EXT3_.*")
        .allowlist_var("EXT4_.*")
        .allowlist_var("LINUX_S_.*")
        .allowlist_var("CHANNEL_FLAGS_.*")
        .allowlist_var("IO_FLAG_.*")
        .allowlist_var("EXT2FS_.*")
        .allowlist_var("XATTR_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .expect("bindgen could not read <ext2fs/ext2fs.h>; install libext2fs-dev (scripts/packages.sh, group build)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("ext2fs_sys.rs"))
        .expect("writing the libext2fs bindings");
}
