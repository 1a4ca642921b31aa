package appkernel

import (
	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/appkernel/sentry"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
)

// A container's statistics come from the sandbox's own accounting (its
// kernel's cgroups, as `runsc events --stats` reads them), since every
// container of a sandbox runs in one host process: CPU time and memory of
// that container alone, in the cgroup format of the node (v1 or v2), as
// CRI reads runc's. The limit reported is the container's own.

// metricsOf turns the sandbox's statistics of container id into metrics.
func metricsOf(id string, ev *sentry.EventOut, res *specs.LinuxResources) (typeurl.Any, error) {
	return typeurl.MarshalAny(metrics(id, ev, res, cgroupstats.Unified()))
}

func metrics(id string, ev *sentry.EventOut, res *specs.LinuxResources, unified bool) any {
	d := ev.Event.Data
	cpu := ev.ContainerUsage[id]
	if cpu == 0 {
		cpu = d.CPU.Usage.Total
	}
	mem := d.Memory.Usage.Usage
	var limit uint64
	if res != nil && res.Memory != nil && res.Memory.Limit != nil && *res.Memory.Limit > 0 {
		limit = uint64(*res.Memory.Limit)
	}
	if unified {
		m := &v2stats.Metrics{
			Pids:   &v2stats.PidsStat{Current: d.Pids.Current, Limit: d.Pids.Limit},
			CPU:    &v2stats.CPUStat{UsageUsec: cpu / 1000, UserUsec: d.CPU.Usage.User / 1000, SystemUsec: d.CPU.Usage.Kernel / 1000},
			Memory: &v2stats.MemoryStat{Usage: mem, UsageLimit: limit, File: d.Memory.Cache},
		}
		if limit == 0 {
			m.Memory.UsageLimit = ^uint64(0)
		}
		return m
	}
	m := &v1stats.Metrics{
		Pids: &v1stats.PidsStat{Current: d.Pids.Current, Limit: d.Pids.Limit},
		CPU: &v1stats.CPUStat{Usage: &v1stats.CPUUsage{
			Total: cpu, User: d.CPU.Usage.User, Kernel: d.CPU.Usage.Kernel, PerCPU: d.CPU.Usage.PerCPU,
		}},
		Memory: &v1stats.MemoryStat{
			Cache: d.Memory.Cache,
			Usage: &v1stats.MemoryEntry{Usage: mem, Limit: limit, Max: d.Memory.Usage.Max, Failcnt: d.Memory.Usage.Failcnt},
		},
	}
	if limit == 0 {
		m.Memory.Usage.Limit = ^uint64(0)
	}
	return m
}
