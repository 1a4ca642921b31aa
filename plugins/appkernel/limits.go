package appkernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Every process of a pod's sandbox (the sentry, which runs all of its
// containers, and their gofers) is in one host cgroup, so the node can
// only limit the pod as a whole; gVisor does not enforce a limit per
// container inside the sandbox. The sandbox's limits are therefore the
// pod's own when CRI gives them, else the sum of its containers' limits,
// as a kubelet sets a pod's cgroup: a memory limit only when every
// container has one, plus what gVisor itself needs; a CPU quota only when
// every container has one; CPU shares summed. A container that goes past
// the memory limit makes the kernel's OOM killer end the sandbox, and its
// containers are reported OOMKilled.

// limits are a sandbox cgroup's settings.
type limits struct {
	// Memory is in bytes; -1 is no limit.
	Memory int64
	// CPUQuota is the CPU time, in µs per CPUPeriod, the sandbox may use;
	// -1 is no limit.
	CPUQuota  int64
	CPUPeriod uint64
	// CPUShares is the relative CPU weight (cgroup v1 shares); 0 leaves it.
	CPUShares uint64
}

const defaultCPUPeriod = 100000

// sandboxLimits computes the limits of a sandbox from the pod's own
// resources and those of its containers.
func sandboxLimits(pod *runtime.LinuxContainerResources, ctrs []*specs.LinuxResources, memOverhead int64) limits {
	l := limits{Memory: -1, CPUQuota: -1, CPUPeriod: defaultCPUPeriod}
	if m := pod.GetMemoryLimitInBytes(); m > 0 {
		l.Memory = m
	} else if len(ctrs) > 0 {
		sum := memOverhead
		for _, r := range ctrs {
			if r == nil || r.Memory == nil || r.Memory.Limit == nil || *r.Memory.Limit <= 0 {
				sum = -1
				break
			}
			sum += *r.Memory.Limit
		}
		l.Memory = sum
	}
	if q := pod.GetCpuQuota(); q > 0 {
		l.CPUQuota = q
		if p := pod.GetCpuPeriod(); p > 0 {
			l.CPUPeriod = uint64(p)
		}
	} else if len(ctrs) > 0 {
		var sum int64
		for _, r := range ctrs {
			if r == nil || r.CPU == nil || r.CPU.Quota == nil || *r.CPU.Quota <= 0 {
				sum = -1
				break
			}
			period := uint64(defaultCPUPeriod)
			if r.CPU.Period != nil && *r.CPU.Period > 0 {
				period = *r.CPU.Period
			}
			// In the sandbox's period.
			sum += int64(uint64(*r.CPU.Quota) * defaultCPUPeriod / period)
		}
		l.CPUQuota = sum
	}
	if s := pod.GetCpuShares(); s > 0 {
		l.CPUShares = uint64(s)
	} else {
		for _, r := range ctrs {
			if r != nil && r.CPU != nil && r.CPU.Shares != nil {
				l.CPUShares += *r.CPU.Shares
			}
		}
		if l.CPUShares > 0 && l.CPUShares < 2 {
			l.CPUShares = 2
		}
	}
	return l
}

// spec is l as the resources of an OCI spec (runsc applies them when it
// creates the cgroup).
func (l limits) spec() *specs.LinuxResources {
	r := &specs.LinuxResources{}
	if l.Memory > 0 {
		m := l.Memory
		r.Memory = &specs.LinuxMemory{Limit: &m}
	}
	if l.CPUQuota > 0 || l.CPUShares > 0 {
		r.CPU = &specs.LinuxCPU{}
		if l.CPUQuota > 0 {
			q, p := l.CPUQuota, l.CPUPeriod
			r.CPU.Quota, r.CPU.Period = &q, &p
		}
		if l.CPUShares > 0 {
			s := l.CPUShares
			r.CPU.Shares = &s
		}
	}
	return r
}

// cgroupWriter writes a cgroup's limits under the cgroup filesystem at
// root (/sys/fs/cgroup), cgroup v1 or v2.
type cgroupWriter struct {
	root    string
	unified bool
}

// apply writes l to the cgroup at path (the same path in every v1
// hierarchy). Every setting is tried; the errors are joined.
func (w cgroupWriter) apply(path string, l limits) error {
	var errs []error
	set := func(controller, file, value string) {
		dir := filepath.Join(w.root, path)
		if !w.unified {
			dir = filepath.Join(w.root, controller, path)
		}
		if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0); err != nil {
			errs = append(errs, fmt.Errorf("setting %s to %s: %w", file, value, err))
		}
	}
	if w.unified {
		mem, cpu := "max", "max"
		if l.Memory > 0 {
			mem = strconv.FormatInt(l.Memory, 10)
		}
		if l.CPUQuota > 0 {
			cpu = strconv.FormatInt(l.CPUQuota, 10)
		}
		set("", "memory.max", mem)
		set("", "cpu.max", cpu+" "+strconv.FormatUint(l.CPUPeriod, 10))
		if l.CPUShares > 0 {
			set("", "cpu.weight", strconv.FormatUint(sharesToWeight(l.CPUShares), 10))
		}
		return errors.Join(errs...)
	}
	set("memory", "memory.limit_in_bytes", strconv.FormatInt(max(l.Memory, -1), 10))
	set("cpu", "cpu.cfs_period_us", strconv.FormatUint(l.CPUPeriod, 10))
	set("cpu", "cpu.cfs_quota_us", strconv.FormatInt(max(l.CPUQuota, -1), 10))
	if l.CPUShares > 0 {
		set("cpu", "cpu.shares", strconv.FormatUint(l.CPUShares, 10))
	}
	return errors.Join(errs...)
}

// sharesToWeight converts cgroup v1 CPU shares to a cgroup v2 weight, as
// runc does.
func sharesToWeight(shares uint64) uint64 {
	if shares == 0 {
		return 0
	}
	shares = max(shares, 2)
	return 1 + ((shares-2)*9999)/262142
}
