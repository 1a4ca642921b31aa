package task

import (
	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	"github.com/containerd/typeurl/v2"
)

// completeStats fills in the parts of cgroup v1 metrics a kind left out
// (a CPU without throttling figures, a memory without swap or kernel
// entries): containerd's own cgroup v1 metrics collector reads them
// without checking and would crash the daemon at its next scrape. Other
// metrics are returned as they are.
func completeStats(st typeurl.Any) typeurl.Any {
	v, err := typeurl.UnmarshalAny(st)
	if err != nil {
		return st
	}
	m, ok := v.(*v1stats.Metrics)
	if !ok {
		return st
	}
	if m.CPU != nil {
		if m.CPU.Usage == nil {
			m.CPU.Usage = &v1stats.CPUUsage{}
		}
		if m.CPU.Throttling == nil {
			m.CPU.Throttling = &v1stats.Throttle{}
		}
	}
	if mem := m.Memory; mem != nil {
		for _, e := range []**v1stats.MemoryEntry{&mem.Usage, &mem.Swap, &mem.Kernel, &mem.KernelTCP} {
			if *e == nil {
				*e = &v1stats.MemoryEntry{}
			}
		}
	}
	if a, err := typeurl.MarshalAny(m); err == nil {
		return a
	}
	return st
}
