package sandbox

import (
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	// Registers the runtime-spec types with typeurl, under the URLs
	// containerd decodes.
	_ "github.com/containerd/containerd/v2/core/runtime"
)

// Annotations CRI puts on a pod's sandbox spec (internal/cri/annotations,
// which this module cannot import).
const (
	annContainerType      = "io.kubernetes.cri.container-type"
	annSandboxID          = "io.kubernetes.cri.sandbox-id"
	annSandboxName        = "io.kubernetes.cri.sandbox-name"
	annSandboxNamespace   = "io.kubernetes.cri.sandbox-namespace"
	annSandboxUID         = "io.kubernetes.cri.sandbox-uid"
	annSandboxLogDir      = "io.kubernetes.cri.sandbox-log-directory"
	annSandboxCPUPeriod   = "io.kubernetes.cri.sandbox-cpu-period"
	annSandboxCPUQuota    = "io.kubernetes.cri.sandbox-cpu-quota"
	annSandboxCPUShares   = "io.kubernetes.cri.sandbox-cpu-shares"
	annSandboxMemoryLimit = "io.kubernetes.cri.sandbox-memory"
)

// podSpec is the OCI spec of a pod that has no pause container: what a
// pause container's spec would tell its readers (NRI plugins first of
// all) about the pod, its annotations and the namespaces its containers
// join. CRI keeps it in the sandbox store as the sandbox's spec.
func podSpec(sb *Sandbox, inst Instance) *specs.Spec {
	cfg := sb.Config
	ann := map[string]string{}
	for k, v := range cfg.GetAnnotations() {
		ann[k] = v
	}
	ann[annContainerType] = "sandbox"
	ann[annSandboxID] = sb.ID
	ann[annSandboxName] = cfg.GetMetadata().GetName()
	ann[annSandboxNamespace] = cfg.GetMetadata().GetNamespace()
	ann[annSandboxUID] = cfg.GetMetadata().GetUid()
	ann[annSandboxLogDir] = cfg.GetLogDirectory()
	if res := cfg.GetLinux().GetResources(); res != nil {
		ann[annSandboxCPUPeriod] = strconv.FormatInt(res.GetCpuPeriod(), 10)
		ann[annSandboxCPUQuota] = strconv.FormatInt(res.GetCpuQuota(), 10)
		ann[annSandboxCPUShares] = strconv.FormatInt(res.GetCpuShares(), 10)
		ann[annSandboxMemoryLimit] = strconv.FormatInt(res.GetMemoryLimitInBytes(), 10)
	}
	spec := &specs.Spec{
		Version:     specs.Version,
		Hostname:    cfg.GetHostname(),
		Annotations: ann,
		Linux:       &specs.Linux{Sysctl: cfg.GetLinux().GetSysctls()},
	}
	if ns, ok := inst.(PodNamespaces); ok {
		spec.Linux.Namespaces = ns.PodNamespaces()
	}
	return spec
}
