package vmm

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// The hypervisor is the pod on the node: it runs in the pod's cgroup (as
// stock containerd puts a pause container), <cgroup_parent>/<sandbox id>,
// so that what the VM uses is charged to the pod. The pod's cgroup must
// therefore leave room for the VM's own overhead besides its containers'
// limits: the RuntimeClass's overhead (contrib/kubernetes).

// vmCgroup is where a pod's hypervisor runs (cgroupfs form).
func vmCgroup(sb *sandbox.Sandbox) string {
	parent := sb.Config.GetLinux().GetCgroupParent()
	switch {
	case parent == "":
		return "/" + sb.Namespace + "/kuasar-vmm-" + sb.ID
	case strings.HasSuffix(parent, ".slice"):
		parent = cgroupstats.ExpandSlice(parent)
	}
	return filepath.Join("/", parent, sb.ID)
}

// joinCgroup moves pid into the cgroup at path (made if needed).
func joinCgroup(path string, pid int) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, &cgroup2.Resources{})
		if err != nil {
			return fmt.Errorf("cgroup %s: %w", path, err)
		}
		return m.AddProc(uint64(pid))
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(path), &specs.LinuxResources{})
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	return cg.AddProc(uint64(pid))
}

// removeCgroup removes the cgroup at path, once nothing runs in it.
func removeCgroup(path string) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return nil
		}
		return m.Delete()
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return nil // gone already
	}
	return cg.Delete()
}
