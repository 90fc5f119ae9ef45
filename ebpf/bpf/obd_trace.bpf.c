// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * Probes for `obd trace record`: block requests issued to one device and
 * page-cache fills of files on it, sent to user space through a ring buffer.
 *
 * Filtering happens here, in the kernel, on the device numbers user space
 * writes into the read-only globals before loading (tracepoint `dev` fields
 * are the kernel's dev_t, MAJOR << 20 | MINOR). The recorder's own process
 * is left out so reading the device to name files does not trace itself.
 */
#include "obd_trace.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* Kernel dev_t of the disk that receives the requests (for a partition:
 * its whole disk). */
const volatile __u32 target_disk = 0;
/* Kernel dev_t of the filesystem's device (s_dev). */
const volatile __u32 target_fs = 0;
/* Process (tgid) whose I/O is not recorded: the recorder itself. */
const volatile __u32 ignore_tgid = 0;

#define EVENT_BLOCK 1
#define EVENT_PAGE 2

/* 64 bytes; user space parses it field by field (ebpf/src/lib.rs). */
struct obd_event {
	__u64 ts_ns;	/* bpf_ktime_get_ns */
	__u64 a;	/* block: sector; page: inode number */
	__u64 b;	/* block: bytes; page: page index */
	__u32 kind;	/* EVENT_BLOCK or EVENT_PAGE */
	__u32 tgid;
	__u32 c;	/* page: folio order */
	__u32 pad;
	char comm[16];
	char rwbs[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24);
} events SEC(".maps");

/* Events dropped because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static __always_inline struct obd_event *reserve(__u32 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct obd_event *e;

	if (ignore_tgid && (__u32)(id >> 32) == ignore_tgid)
		return 0;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->kind = kind;
	e->tgid = id >> 32;
	e->c = 0;
	e->pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

SEC("tracepoint/block/block_rq_issue")
int block_rq_issue(struct trace_event_raw_block_rq *ctx)
{
	struct obd_event *e;

	if (ctx->dev != target_disk)
		return 0;
	e = reserve(EVENT_BLOCK);
	if (!e)
		return 0;
	e->a = ctx->sector;
	e->b = ctx->bytes;
	if (!e->b)
		e->b = (__u64)ctx->nr_sector << 9;
	bpf_core_read(e->rwbs, sizeof(e->rwbs), &ctx->rwbs);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/filemap/mm_filemap_add_to_page_cache")
int page_cache_add(struct trace_event_raw_mm_filemap_op_page_cache *ctx)
{
	struct obd_event *e;

	if (ctx->s_dev != target_fs)
		return 0;
	e = reserve(EVENT_PAGE);
	if (!e)
		return 0;
	e->a = ctx->i_ino;
	e->b = ctx->index;
	if (bpf_core_field_exists(ctx->order))
		e->c = ctx->order;
	__builtin_memset(e->rwbs, 0, sizeof(e->rwbs));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
