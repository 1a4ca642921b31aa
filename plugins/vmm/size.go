package vmm

import (
	"fmt"

	"github.com/containerd/errdefs"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// memoryStepMiB rounds a VM's memory up, so that pods of nearly the same
// size share a template.
const memoryStepMiB = 64

// size is a pod's VM: its vCPUs and memory. The pod's resources (what the
// kubelet puts in the sandbox config: the pod's CPU and memory limits,
// from pod-level resources or the sum of its containers') size it: a
// memory limit plus the configured overhead (the guest's kernel and
// agent), at least the default; the defaults size a pod that says
// nothing.
func (k *kind) size(cfg *runtime.PodSandboxConfig) (vcpus, memMiB int, err error) {
	vcpus, memMiB = k.cfg.DefaultVCPUs, k.cfg.DefaultMemoryMiB
	tooBig := func(what string) error {
		return fmt.Errorf("the pod's %s asks for a VM larger than %s allows (max_vcpus %d, max_memory_mib %d): %w",
			what, ID, k.cfg.MaxVCPUs, k.cfg.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	if res := cfg.GetLinux().GetResources(); res != nil {
		if q, per := res.GetCpuQuota(), res.GetCpuPeriod(); q > 0 && per > 0 {
			// Compared before rounding: a huge quota must not wrap.
			if n := int64(k.cfg.MaxVCPUs); q/per > n || (q/per == n && q%per != 0) {
				return 0, 0, tooBig(fmt.Sprintf("CPU quota %d/%d", q, per))
			}
			vcpus = max(vcpus, int((q+per-1)/per))
		}
		if m := res.GetMemoryLimitInBytes(); m > 0 {
			if m>>20 >= int64(k.cfg.MaxMemoryMiB) {
				return 0, 0, tooBig(fmt.Sprintf("memory limit %d", m))
			}
			memMiB = max(memMiB, int((m+1<<20-1)>>20)+k.cfg.OverheadMemoryMiB)
		}
	}
	memMiB = (memMiB + memoryStepMiB - 1) / memoryStepMiB * memoryStepMiB
	if vcpus > k.cfg.MaxVCPUs || memMiB > k.cfg.MaxMemoryMiB {
		return 0, 0, fmt.Errorf("the pod asks for a VM of %d vCPUs and %d MiB, more than %s allows (max_vcpus %d, max_memory_mib %d): %w",
			vcpus, memMiB, ID, k.cfg.MaxVCPUs, k.cfg.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	return vcpus, memMiB, nil
}
