package agent

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"
)

// cgroupRoot is the guest's cgroup v2 mount.
const cgroupRoot = "/sys/fs/cgroup"

// The guest reads its cgroups itself rather than through
// github.com/containerd/cgroups/v3/cgroup2, whose manager (eBPF device
// filters, systemd over D-Bus) would add more than a megabyte to the
// agent; only its metrics types are used.

// cgroupMetrics reads the metrics of a guest cgroup (a path below
// /sys/fs/cgroup) as io.containerd.cgroups.v2.Metrics, what containerd's
// CRI reads from a task's Stats. A cgroup that does not exist (yet) has
// empty metrics.
func cgroupMetrics(group string) (*anypb.Any, error) {
	if group == "" {
		return nil, fmt.Errorf("no cgroup: %w", errdefs.ErrNotFound)
	}
	m, err := readMetrics(filepath.Join(cgroupRoot, filepath.Clean("/"+group)))
	if err != nil {
		return nil, err
	}
	return typeurl.MarshalAnyToProto(m)
}

// readMetrics reads the cgroup directory dir.
func readMetrics(dir string) (*v2stats.Metrics, error) {
	m := &v2stats.Metrics{}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return m, nil
	} else if err != nil {
		return nil, err
	}
	value := func(file string) uint64 { return readValue(filepath.Join(dir, file)) }
	m.Pids = &v2stats.PidsStat{Current: value("pids.current"), Limit: value("pids.max")}

	cpu, err := readKeyed(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return nil, err
	}
	m.CPU = &v2stats.CPUStat{
		UsageUsec: cpu["usage_usec"], UserUsec: cpu["user_usec"], SystemUsec: cpu["system_usec"],
		NrPeriods: cpu["nr_periods"], NrThrottled: cpu["nr_throttled"], ThrottledUsec: cpu["throttled_usec"],
		NrBursts: cpu["nr_bursts"], BurstUsec: cpu["burst_usec"],
	}

	mem, err := readKeyed(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return nil, err
	}
	ms := &v2stats.MemoryStat{
		Usage: value("memory.current"), UsageLimit: value("memory.max"), MaxUsage: value("memory.peak"),
		SwapUsage: value("memory.swap.current"), SwapLimit: value("memory.swap.max"),
	}
	for key, field := range map[string]*uint64{
		"anon": &ms.Anon, "file": &ms.File, "kernel_stack": &ms.KernelStack, "slab": &ms.Slab,
		"sock": &ms.Sock, "shmem": &ms.Shmem, "file_mapped": &ms.FileMapped, "file_dirty": &ms.FileDirty,
		"file_writeback": &ms.FileWriteback, "anon_thp": &ms.AnonThp, "inactive_anon": &ms.InactiveAnon,
		"active_anon": &ms.ActiveAnon, "inactive_file": &ms.InactiveFile, "active_file": &ms.ActiveFile,
		"unevictable": &ms.Unevictable, "slab_reclaimable": &ms.SlabReclaimable,
		"slab_unreclaimable": &ms.SlabUnreclaimable, "pgfault": &ms.Pgfault, "pgmajfault": &ms.Pgmajfault,
		"workingset_refault": &ms.WorkingsetRefault, "workingset_activate": &ms.WorkingsetActivate,
		"workingset_nodereclaim": &ms.WorkingsetNodereclaim, "pgrefill": &ms.Pgrefill, "pgscan": &ms.Pgscan,
		"pgsteal": &ms.Pgsteal, "pgactivate": &ms.Pgactivate, "pgdeactivate": &ms.Pgdeactivate,
		"pglazyfree": &ms.Pglazyfree, "pglazyfreed": &ms.Pglazyfreed, "thp_fault_alloc": &ms.ThpFaultAlloc,
		"thp_collapse_alloc": &ms.ThpCollapseAlloc,
	} {
		*field = mem[key]
	}
	m.Memory = ms

	ev, err := readKeyed(filepath.Join(dir, "memory.events"))
	if err != nil {
		return nil, err
	}
	if len(ev) > 0 {
		m.MemoryEvents = &v2stats.MemoryEvents{
			Low: ev["low"], High: ev["high"], Max: ev["max"], Oom: ev["oom"],
			OomKill: ev["oom_kill"], OomGroupKill: ev["oom_group_kill"],
		}
	}
	io, err := readIOStat(filepath.Join(dir, "io.stat"))
	if err != nil {
		return nil, err
	}
	m.Io = &v2stats.IOStat{Usage: io}
	return m, nil
}

// oomKills is the oom_kill count of a guest cgroup's memory.events.
func oomKills(group string) (uint64, error) {
	ev, err := readKeyed(filepath.Join(cgroupRoot, filepath.Clean("/"+group), "memory.events"))
	return ev["oom_kill"], err
}

// readValue reads a file holding one number ("max": math.MaxUint64); a
// missing or unreadable file is 0, as for a controller the cgroup lacks.
func readValue(path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return parseValue(strings.TrimSpace(string(b)))
}

func parseValue(s string) uint64 {
	if s == "max" {
		return math.MaxUint64
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0
	}
	return v
}

// readKeyed reads a flat keyed file ("key value" lines); a missing file is
// empty.
func readKeyed(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]uint64{}, nil
	}
	if err != nil {
		return nil, err
	}
	return parseKeyed(string(b)), nil
}

func parseKeyed(s string) map[string]uint64 {
	out := map[string]uint64{}
	for _, l := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), " "); ok {
			out[k] = parseValue(strings.TrimSpace(v))
		}
	}
	return out
}

// readIOStat reads io.stat ("MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...").
func readIOStat(path string) ([]*v2stats.IOEntry, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return parseIOStat(string(b)), nil
}

func parseIOStat(s string) []*v2stats.IOEntry {
	var out []*v2stats.IOEntry
	for _, l := range strings.Split(s, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		maj, min, ok := strings.Cut(f[0], ":")
		if !ok {
			continue
		}
		e := &v2stats.IOEntry{Major: parseValue(maj), Minor: parseValue(min)}
		for _, kv := range f[1:] {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "rbytes":
				e.Rbytes = parseValue(v)
			case "wbytes":
				e.Wbytes = parseValue(v)
			case "rios":
				e.Rios = parseValue(v)
			case "wios":
				e.Wios = parseValue(v)
			}
		}
		out = append(out, e)
	}
	return out
}
