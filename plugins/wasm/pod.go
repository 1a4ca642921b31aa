package wasm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// pod is one kuasar-wasm sandbox. It owns no process: its network
// namespace is CRI's, its containers are module instances in the host.
type pod struct {
	k  *kind
	sb *sandbox.Sandbox

	mu         sync.Mutex
	containers map[string]string // host IDs of its containers: the boot of their host
}

// key names the pod in the host.
func (p *pod) key() string { return p.sb.Namespace + "/" + p.sb.ID }

func (p *pod) create(ctx context.Context) (retErr error) {
	ns := p.sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions()
	if u := ns.GetUsernsOptions(); u != nil && u.GetMode() == runtime.NamespaceMode_POD {
		return fmt.Errorf("pod user namespaces are not supported by %s: %w", ID, errdefs.ErrNotImplemented)
	}
	if !p.sb.HostNetwork() && p.sb.NetNSPath == "" {
		return fmt.Errorf("pod has no network namespace from CRI: %w", errdefs.ErrInvalidArgument)
	}
	return p.applySysctls()
}

// applySysctls sets the pod's network sysctls in its network namespace.
// Others need kernel namespaces a Wasm pod does not have.
func (p *pod) applySysctls() error {
	sysctls := p.sb.Config.GetLinux().GetSysctls()
	if len(sysctls) == 0 {
		return nil
	}
	for name := range sysctls {
		if nsutil.SysctlNamespace(name) != nsutil.Net {
			return fmt.Errorf("sysctl %q is not supported by %s pods (only net.* sysctls are: a Wasm pod has no IPC or UTS namespace): %w",
				name, ID, errdefs.ErrInvalidArgument)
		}
	}
	paths := map[nsutil.Kind]string{}
	if !p.sb.HostNetwork() {
		paths[nsutil.Net] = p.sb.NetNSPath
	}
	if err := nsutil.ApplySysctls(paths, sysctls); err != nil {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (p *pod) Start(context.Context) error { return nil }

func (p *pod) Runtime() task.Runtime { return &containers{pod: p, k: p.k} }

// Stop has nothing to end: the framework killed the containers.
func (p *pod) Stop(context.Context) error { return nil }

// Shutdown releases whatever the host still holds of the pod.
func (p *pod) Shutdown(ctx context.Context) error {
	if err := p.k.host.ReleasePod(ctx, p.key()); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("releasing the pod in the wasm host")
	}
	return nil
}

// PodNamespaces: a Wasm pod's only namespace on the node is its network.
func (p *pod) PodNamespaces() []specs.LinuxNamespace {
	if p.sb.HostNetwork() {
		return nil
	}
	return []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: p.sb.NetNSPath}}
}

// track records a container of the pod and the boot of its host ("" for
// a record of before boots were kept: any host).
func (p *pod) track(hostID, boot string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.containers[hostID] = boot
}

// untrack forgets a deleted container.
func (p *pod) untrack(hostID string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.containers, hostID)
}

// Metrics sums the pod's containers.
func (p *pod) Metrics(ctx context.Context) (*types.Metric, error) {
	p.mu.Lock()
	refs := make([]*api.ProcessRef, 0, len(p.containers))
	for id, boot := range p.containers {
		refs = append(refs, &api.ProcessRef{Id: id, Boot: boot})
	}
	p.mu.Unlock()
	sort.Slice(refs, func(i, j int) bool { return refs[i].Id < refs[j].Id })
	sum := &api.ContainerStats{}
	for _, ref := range refs {
		s, err := p.k.host.Stats(ctx, ref)
		if err != nil {
			continue // exited and deleted meanwhile, or the host is gone
		}
		sum.MemoryBytes += s.GetMemoryBytes()
		sum.MemoryMax += s.GetMemoryMax()
		sum.CpuUserNanos += s.GetCpuUserNanos()
		sum.CpuSystemNanos += s.GetCpuSystemNanos()
		sum.CpuPeriods += s.GetCpuPeriods()
		sum.CpuThrottledPeriods += s.GetCpuThrottledPeriods()
		sum.CpuThrottledNanos += s.GetCpuThrottledNanos()
		sum.OomKills += s.GetOomKills()
	}
	sum.MemoryLimit = uint64(podMemoryLimit(p.sb))
	data, err := metrics(sum)
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: p.sb.ID, Data: data}, nil
}

func (p *pod) Info() map[string]any {
	info := map[string]any{"pid": 0, "engine": "wazero"}
	if boot := p.k.host.Boot(); boot != "" {
		info["wasmHost"] = boot
	}
	return info
}

// metrics renders stats in containerd's cgroup v1 metrics format, which
// CRI reads for container and pod stats.
func metrics(s *api.ContainerStats) (*anypb.Any, error) {
	m := &v1stats.Metrics{
		CPU: &v1stats.CPUStat{
			Usage: &v1stats.CPUUsage{
				Total:  s.GetCpuUserNanos() + s.GetCpuSystemNanos(),
				User:   s.GetCpuUserNanos(),
				Kernel: s.GetCpuSystemNanos(),
			},
			Throttling: &v1stats.Throttle{
				Periods:          s.GetCpuPeriods(),
				ThrottledPeriods: s.GetCpuThrottledPeriods(),
				ThrottledTime:    s.GetCpuThrottledNanos(),
			},
		},
		Memory: &v1stats.MemoryStat{
			RSS:      s.GetMemoryBytes(),
			TotalRSS: s.GetMemoryBytes(),
			Usage:    &v1stats.MemoryEntry{Usage: s.GetMemoryBytes(), Max: s.GetMemoryMax(), Limit: s.GetMemoryLimit(), Failcnt: s.GetOomKills()},
		},
	}
	a, err := typeurl.MarshalAny(m)
	if err != nil {
		return nil, err
	}
	return typeurl.MarshalProto(a), nil
}

// podMemoryLimit is the pod's memory limit: its pod-level resources when
// CRI passes them, else the limit of its cgroup parent (which the kubelet
// sets to the sum of its containers' limits).
func podMemoryLimit(sb *sandbox.Sandbox) int64 {
	if l := sb.Config.GetLinux().GetResources().GetMemoryLimitInBytes(); l > 0 {
		return l
	}
	parent := sb.Config.GetLinux().GetCgroupParent()
	if parent == "" {
		return 0
	}
	parent = cgroupstats.ExpandSlice(parent)
	var file string
	if cgroupstats.Unified() {
		file = filepath.Join("/sys/fs/cgroup", parent, "memory.max")
	} else {
		file = filepath.Join("/sys/fs/cgroup/memory", parent, "memory.limit_in_bytes")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || v <= 0 || v >= 1<<62 {
		return 0 // "max", or v1's "unlimited"
	}
	return v
}
