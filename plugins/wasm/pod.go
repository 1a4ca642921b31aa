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
	"google.golang.org/protobuf/types/known/anypb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// pod is one kuasar-wasm sandbox. It owns no process: its network
// namespace is CRI's, its containers are module instances in the host.
type pod struct {
	k  *kind
	sb *sandbox.Sandbox

	mu         sync.Mutex
	containers map[string]bool // host IDs of its containers
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
	if err := p.applySysctls(); err != nil {
		return err
	}
	if err := sandbox.WritePodFiles(p.sb); err != nil {
		return err
	}
	return nil
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

// Shutdown releases whatever the host still holds of the pod, and CRI's
// pod files.
func (p *pod) Shutdown(ctx context.Context) error {
	if err := p.k.host.ReleasePod(ctx, p.key()); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("releasing the pod in the wasm host")
	}
	return sandbox.RemovePodFiles(p.sb)
}

func (p *pod) track(hostID string, live bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if live {
		p.containers[hostID] = true
	} else {
		delete(p.containers, hostID)
	}
}

// Metrics sums the pod's containers.
func (p *pod) Metrics(ctx context.Context) (*types.Metric, error) {
	p.mu.Lock()
	ids := make([]string, 0, len(p.containers))
	for id := range p.containers {
		ids = append(ids, id)
	}
	p.mu.Unlock()
	sort.Strings(ids)
	var sum wasmhost.Stats
	for _, id := range ids {
		s, err := p.k.host.Stats(ctx, id)
		if err != nil {
			continue // exited and deleted meanwhile, or the host is gone
		}
		sum.MemoryBytes += s.MemoryBytes
		sum.MemoryMax += s.MemoryMax
		sum.CPUUserNanos += s.CPUUserNanos
		sum.CPUSystemNanos += s.CPUSystemNanos
		sum.CPUPeriods += s.CPUPeriods
		sum.CPUThrottledPeriods += s.CPUThrottledPeriods
		sum.CPUThrottledNanos += s.CPUThrottledNanos
		sum.OOMKills += s.OOMKills
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
func metrics(s wasmhost.Stats) (*anypb.Any, error) {
	m := &v1stats.Metrics{
		CPU: &v1stats.CPUStat{
			Usage: &v1stats.CPUUsage{
				Total:  s.CPUUserNanos + s.CPUSystemNanos,
				User:   s.CPUUserNanos,
				Kernel: s.CPUSystemNanos,
			},
			Throttling: &v1stats.Throttle{
				Periods:          s.CPUPeriods,
				ThrottledPeriods: s.CPUThrottledPeriods,
				ThrottledTime:    s.CPUThrottledNanos,
			},
		},
		Memory: &v1stats.MemoryStat{
			RSS:      s.MemoryBytes,
			TotalRSS: s.MemoryBytes,
			Usage:    &v1stats.MemoryEntry{Usage: s.MemoryBytes, Max: s.MemoryMax, Limit: s.MemoryLimit, Failcnt: s.OOMKills},
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
