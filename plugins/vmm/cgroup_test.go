package vmm

import (
	"path/filepath"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// A pod's cgroup_parent comes from the CRI client. cgroup1.StaticPath and
// cgroup2.NewManager join it with the hierarchy's root as it is: a relative
// parent with ".." escapes /sys/fs/cgroup, and joinCgroup then makes
// directories and writes the VM's pid into "cgroup.procs" files anywhere on
// the node (removeCgroup removes them). Stock runc cleans the path to
// beneath the hierarchy (libcontainer's CleanPath); so does kuasar-gvisor
// (path.Join("/", ...)).
func TestVMCgroupStaysInHierarchy(t *testing.T) {
	for _, parent := range []string{"../../../../tmp/evil", "kubepods/../../../../etc", "a/../../b"} {
		sb := &sandbox.Sandbox{ID: "p1", Namespace: "k8s.io", Config: &runtime.PodSandboxConfig{
			Linux: &runtime.LinuxPodSandboxConfig{CgroupParent: parent},
		}}
		cg := vmCgroup(sb)
		// What cgroup1/cgroup2 do with it: join with a hierarchy root.
		root := "/sys/fs/cgroup/memory"
		if full := filepath.Join(root, cg); !strings.HasPrefix(full, root+"/") {
			t.Errorf("cgroup_parent %q: the VM's cgroup %q is %s, outside %s", parent, cg, full, root)
		}
	}
}
