/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only */
/*
 * The few kernel types the probes read, instead of a full vmlinux.h.
 *
 * Why not generate vmlinux.h at build time: that needs bpftool and the
 * build machine's /sys/kernel/btf/vmlinux (absent in containers and on
 * non-BTF kernels) and yields a multi-megabyte header tied to that one
 * kernel. These declarations carry preserve_access_index, so every field
 * offset is a CO-RE relocation that aya resolves against the running
 * kernel's BTF at load time: the layout below only has to name the fields,
 * not match any kernel exactly (rwbs was char[8] before 6.x, ioprio is new).
 */
#ifndef OBD_TRACE_H
#define OBD_TRACE_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u32 __be32;
typedef __u16 __be16;
typedef __u32 __wsum;
typedef __u32 dev_t;
typedef __u64 sector_t;

/* Enough of linux/bpf.h for bpf_helpers.h / bpf_helper_defs.h. */
enum bpf_map_type {
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_RINGBUF = 27,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

/* block:block_rq_issue (and block_io_start): one request to a device. */
struct trace_event_raw_block_rq {
	struct trace_entry ent;
	dev_t dev;
	sector_t sector;
	unsigned int nr_sector;
	unsigned int bytes;
	char rwbs[8];
	char comm[16];
};

/* filemap:mm_filemap_add_to_page_cache: a page-cache miss filled. */
struct trace_event_raw_mm_filemap_op_page_cache {
	struct trace_entry ent;
	unsigned long pfn;
	unsigned long i_ino;
	unsigned long index;
	dev_t s_dev;
	unsigned char order;
};

#pragma clang attribute pop

#endif
