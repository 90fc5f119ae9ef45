#!/usr/bin/env bash
# Where the time goes (issue 12): one VM boot serves bench-ublk's 5-layer
# stack through a front end, runs one fio workload on it, and samples the
# whole guest with `perf record -a` (cpu-clock, qemu TCG has no PMU) while
# it runs. Not a test, not a benchmark: the fio figure it prints is one
# run; read the shares of CPU time.
#
#   bash scripts/profile-ublk.sh [--front ublk|ublk2|tcmu|ref] [--kind lsmt|zfile|mixed]
#                                [--workload seq|rand] [--seconds S] [--callers]
#                                [--storage disk|tmpfs] [--ref-tcmu PATH] [--mem MB] [--no-build]
#
# Needs the data of scripts/bench-ublk.sh (target/bench/data/; run that
# once first). The layers are copied to the guest's storage: as in
# bench-ublk, ext4 on a virtio disk (default) or tmpfs. Fronts: ublk =
# `obd add --queues 1`, ublk2 = `--queues 2`, tcmu = `obd tcmu` with the
# snapshotter's configfs steps, ref = the reference overlaybd-tcmu given by
# --ref-tcmu (see scripts/bench-ublk.md). Workloads as in bench-ublk:
# seq = read bs=1M iodepth=8, rand = randread bs=4k iodepth=32, direct.
# --callers records call graphs (frame pointers: the kernel's only).
# Writes target/bench/profile-FRONT-KIND-WORKLOAD.txt: fio's result, the
# daemon's CPU by thread, and `perf report` by command, by shared object
# and by symbol.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
DATA=$BENCH/data

front=ublk
kind=zfile
workload=rand
seconds=15
callers=0
storage=disk
ref_tcmu=
mem=6144
while (($#)); do
    case $1 in
        --front) front=$2; shift 2 ;;
        --kind) kind=$2; shift 2 ;;
        --workload) workload=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --callers) callers=1; shift ;;
        --storage) storage=$2; shift 2 ;;
        --ref-tcmu) ref_tcmu=$2; shift 2 ;;
        *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
    esac
done
[[ $front =~ ^(ublk|ublk2|tcmu|ref)$ && $kind =~ ^(lsmt|zfile|mixed)$ && $workload =~ ^(seq|rand)$ &&
    $seconds =~ ^[1-9][0-9]*$ && $storage =~ ^(disk|tmpfs)$ ]] || usage
[[ $front != ref || -n $ref_tcmu ]] || { say "--front ref needs --ref-tcmu PATH"; exit 2; }
NAME=profile-$front-$kind-$workload

host_main() {
    install_obd
    [[ -s $DATA/layer4.$kind ]] || { say "no bench data: run scripts/bench-ublk.sh once first"; exit 2; }
    local results rc=0 extra=()
    [[ -z $ref_tcmu ]] || extra+=(--ref-tcmu "$(realpath -s "$ref_tcmu")")
    ((!callers)) || extra+=(--callers)
    BENCH_DISK_ARGS=()
    [[ $storage != disk ]] || bench_disk "$BENCH/profile-disk.img" 4G obdprofile
    results=$(mktemp -d /tmp/obd-profile.XXXXXX)
    tests/vm/run.sh --timeout $((900 + 4 * seconds)) --mem "$mem" --results "$results" --quiet "${BENCH_DISK_ARGS[@]}" \
        -- bash scripts/profile-ublk.sh --guest --front "$front" --kind "$kind" --workload "$workload" \
        --seconds "$seconds" --storage "$storage" "${extra[@]}" || rc=$?
    rm -f "$BENCH/profile-disk.img"
    if [[ -s $results/$NAME.txt ]]; then
        cp "$results/$NAME.txt" "$BENCH/"
        cat "$BENCH/$NAME.txt"
        say "written to $BENCH/$NAME.txt"
    else
        say "no profile came back (VM results in $results)"
    fi
    return "$rc"
}

guest_main() {
    local W=/tmp/profile OUT=${OBD_VM_RESULTS:-/tmp} OBD=$BENCH/obd dev daemon cfg
    mkdir -p "$W"
    [[ $storage != disk ]] || mount_bench_disk obdprofile "$W"
    cp "$DATA"/layer[0-4]."$kind" "$W/"
    cfg=$W/$kind.json
    write_stack_config "$cfg" "$W"/layer[0-4]."$kind"
    local size=$((1 << 30))
    case $front in
        ublk | ublk2)
            dev=$("$OBD" add --config "$cfg" --queues "$([[ $front == ublk2 ]] && echo 2 || echo 1)")
            daemon=$(pgrep -f -- "--config $cfg" | head -n 1)
            ;;
        tcmu | ref)
            # shellcheck source=tests/vm/tcmu/lib.sh
            . "$REPO/tests/vm/tcmu/lib.sh"
            if [[ $front == tcmu ]]; then
                "$OBD" tcmu >"$W/daemon.log" 2>&1 &
            else
                mkdir -p /tmp/obd-ref/registry_cache
                echo '{}' >/tmp/obd-ref/cred.json
                printf '{"logConfig":{"logLevel":1,"logPath":"/tmp/obd-ref/log"},"cacheConfig":{"cacheType":"file","cacheDir":"/tmp/obd-ref/registry_cache","cacheSizeGB":1},"credentialConfig":{"mode":"file","path":"/tmp/obd-ref/cred.json"},"ioEngine":0,"download":{"enable":false},"p2pConfig":{"enable":false},"exporterConfig":{"enable":false},"serviceConfig":{"enable":false}}' >/tmp/obd-ref/overlaybd.json
                "$ref_tcmu" /tmp/obd-ref/overlaybd.json >"$W/daemon.log" 2>&1 &
                sleep 3
            fi
            daemon=$!
            make_dev "prof" "$cfg" "$size" || { echo "TCMU device not made"; exit 1; }
            dev=${DEV[prof]}
            ;;
    esac
    [[ -b $dev ]] || { echo "no device ($dev)"; exit 1; }
    echo 0 >/proc/sys/kernel/kptr_restrict
    echo -1 >/proc/sys/kernel/perf_event_paranoid
    local args
    read -r -a args <<<"$(fio_read_args "$workload")"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    local t0 t1 graph=()
    ((callers)) && graph=(-g)
    t0=$(awk '{ print $14 + $15 }' /proc/"$daemon"/stat)
    for t in /proc/"$daemon"/task/*; do echo "${t##*/} $(cat "$t/comm") $(awk '{ print $14, $15 }' "$t/stat")"; done >"$W/t0"
    perf record -a "${graph[@]}" -F 499 -o "$W/perf.data" -- \
        fio --name="$workload" --filename="$dev" --direct=1 --ioengine=io_uring "${args[@]}" \
        --time_based --runtime="$seconds" --output-format=terse --terse-version=3 >"$W/fio.txt" 2>"$W/perf.err"
    for t in /proc/"$daemon"/task/*; do echo "${t##*/} $(cat "$t/comm") $(awk '{ print $14, $15 }' "$t/stat")"; done >"$W/t1"
    t1=$(awk '{ print $14 + $15 }' /proc/"$daemon"/stat)
    {
        echo "# $NAME: $front over the 5-layer $kind stack ($storage), fio $workload ${seconds} s, $(nproc) vCPUs, kernel $(uname -r)"
        awk -F';' '{ printf "fio: %.0f MB/s, %.0f IOPS\n", $7 / 1024, $8 }' "$W/fio.txt"
        echo "daemon CPU: $(((t1 - t0) * 100 / $(getconf CLK_TCK) / seconds))% of one vCPU; by thread (ticks user sys):"
        join <(sort "$W/t0") <(sort "$W/t1") 2>/dev/null |
            awk '{ u = $6 - $3; s = $7 - $4; if (u + s) printf "  %s (tid %s): %d user + %d sys\n", $2, $1, u, s }' |
            sort -t: -k2 -nr || true
        echo
        echo "## by command"
        perf report -i "$W/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 15
        echo
        echo "## by command and shared object"
        perf report -i "$W/perf.data" --no-children --sort comm,dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 20
        echo
        echo "## by symbol (top 60)"
        perf report -i "$W/perf.data" --no-children --sort comm,sym --stdio -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 60
        if ((callers)); then
            echo
            echo "## call graphs (caller order, top 200 lines)"
            perf report -i "$W/perf.data" --children --sort sym --stdio -G 2>/dev/null |
                grep -v '^$' | head -n 200
        fi
    } >"$OUT/$NAME.txt"
    case $front in
        ublk | ublk2) "$OBD" del -n "${dev#/dev/ublkb}" ;;
        *) remove_dev prof || true; kill "$daemon" 2>/dev/null || true ;;
    esac
}

run_bench
