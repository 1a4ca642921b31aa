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
	if res := cfg.GetLinux().GetResources(); res != nil {
		if q, per := res.GetCpuQuota(), res.GetCpuPeriod(); q > 0 && per > 0 {
			vcpus = max(vcpus, int((q+per-1)/per))
		}
		if m := res.GetMemoryLimitInBytes(); m > 0 {
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
