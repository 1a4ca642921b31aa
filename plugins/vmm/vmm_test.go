package vmm

import (
	"errors"
	"math"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

func TestGuestSpec(t *testing.T) {
	spec := func() *specs.Spec {
		return &specs.Spec{
			Process: &specs.Process{Args: []string{"sh"}, ApparmorProfile: "cri-containerd.apparmor.d"},
			Root:    &specs.Root{Path: "rootfs", Readonly: true},
			Hooks:   &specs.Hooks{Prestart: []specs.Hook{{Path: "/usr/bin/host-hook"}}},
			Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Source: "proc"},
				{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid"}},
				{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/pod/etc/hosts", Options: []string{"rbind", "rprivate", "ro"}},
				{Destination: "/data", Source: "/srv/data", Options: []string{"rbind", "rw"}},
			},
			Linux: &specs.Linux{
				CgroupsPath: "/kubepods/pod1/c1",
				Devices:     []specs.LinuxDevice{{Path: "/dev/sda"}},
				Namespaces: []specs.LinuxNamespace{
					{Type: specs.NetworkNamespace, Path: "/proc/0/ns/net"},
					{Type: specs.IPCNamespace, Path: "/proc/0/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/0/ns/uts"},
					{Type: specs.PIDNamespace, Path: "/proc/0/ns/pid"},
					{Type: specs.MountNamespace},
				},
			},
		}
	}
	g, binds, err := guestSpec(spec(), "c1", true)
	if err != nil {
		t.Fatal(err)
	}
	bundle := guest.BundleDir("c1")
	if g.Root.Path != bundle+"/rootfs" || !g.Root.Readonly {
		t.Errorf("root %+v", g.Root)
	}
	if g.Hooks != nil || g.Process.ApparmorProfile != "" || len(g.Linux.Devices) != 0 {
		t.Errorf("host-only parts kept: hooks %v, apparmor %q, devices %v", g.Hooks, g.Process.ApparmorProfile, g.Linux.Devices)
	}
	if g.Linux.CgroupsPath != "/kuasar/c1" {
		t.Errorf("cgroups path %q", g.Linux.CgroupsPath)
	}
	ns := map[specs.LinuxNamespaceType]string{}
	for _, n := range g.Linux.Namespaces {
		ns[n.Type] = n.Path
	}
	want := map[specs.LinuxNamespaceType]string{
		specs.IPCNamespace: guest.PodNSDir + "/ipc", specs.UTSNamespace: guest.PodNSDir + "/uts",
		specs.PIDNamespace: guest.PodNSDir + "/pid", specs.MountNamespace: "", specs.CgroupNamespace: "",
	}
	if len(ns) != len(want) {
		t.Errorf("namespaces %v, want %v", ns, want)
	}
	for k, v := range want {
		if got, ok := ns[k]; !ok || got != v {
			t.Errorf("namespace %s = %q, want %q", k, got, v)
		}
	}
	m := map[string]specs.Mount{}
	for _, x := range g.Mounts {
		m[x.Destination] = x
	}
	if m["/dev/shm"].Source != guest.PodShmDir || m["/dev/shm"].Type != "bind" {
		t.Errorf("/dev/shm %+v", m["/dev/shm"])
	}
	if m["/etc/hosts"].Source != bundle+"/mounts/0" || m["/data"].Source != bundle+"/mounts/1" || m["/proc"].Source != "proc" {
		t.Errorf("mounts %+v", g.Mounts)
	}
	if len(binds) != 2 || binds[0].Source != "/var/lib/pod/etc/hosts" || !binds[0].ReadOnly || binds[1].ReadOnly || binds[1].Target != "mounts/1" {
		t.Errorf("host binds %+v", binds)
	}

	// The pod's PID namespace is only there when the pod shares one; user
	// namespaces are not supported.
	if _, _, err := guestSpec(spec(), "c1", false); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("pod pid namespace of a pod that shares none: %v", err)
	}
	s := spec()
	s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
	if _, _, err := guestSpec(s, "c1", true); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("user namespace: %v", err)
	}
}

func TestSize(t *testing.T) {
	k := &kind{cfg: *DefaultConfig()}
	k.cfg.OverheadMemoryMiB = 96
	res := func(quota, period, mem int64) *runtime.PodSandboxConfig {
		return &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{Resources: &runtime.LinuxContainerResources{
			CpuQuota: quota, CpuPeriod: period, MemoryLimitInBytes: mem,
		}}}
	}
	for _, tc := range []struct {
		name      string
		cfg       *runtime.PodSandboxConfig
		vcpus, mb int
		err       error
	}{
		{"defaults", &runtime.PodSandboxConfig{}, 1, 128, nil},
		{"pod limits", res(250000, 100000, 200<<20), 3, 320, nil},
		{"small limit", res(50000, 100000, 16<<20), 1, 128, nil},
		{"memory only", res(0, 0, 1<<30), 1, 1152, nil},
		{"too big", res(0, 0, 64<<30), 0, 0, errdefs.ErrInvalidArgument},
		{"too many cpus", res(100*100000, 100000, 0), 0, 0, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, m, err := k.size(tc.cfg)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || v != tc.vcpus || m != tc.mb {
				t.Fatalf("size %d vCPUs %d MiB (%v), want %d %d", v, m, err, tc.vcpus, tc.mb)
			}
		})
	}
}

// A pod's resources come from the CRI client: values past what max_vcpus
// and max_memory_mib allow must be refused, however large. Near the top of
// int64 the rounding overflows, the result is negative, and the pod gets a
// default-sized VM instead of an error.
func TestSizeHugeValuesRefused(t *testing.T) {
	k := &kind{cfg: *DefaultConfig()}
	res := func(quota, period, mem int64) *runtime.PodSandboxConfig {
		return &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{Resources: &runtime.LinuxContainerResources{
			CpuQuota: quota, CpuPeriod: period, MemoryLimitInBytes: mem,
		}}}
	}
	for name, cfg := range map[string]*runtime.PodSandboxConfig{
		"cpu quota max int64":   res(math.MaxInt64, 100000, 0),
		"memory max int64":      res(0, 0, math.MaxInt64),
		"memory max int64 - 1M": res(0, 0, math.MaxInt64-1<<20),
	} {
		v, m, err := k.size(cfg)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: a VM of %d vCPUs and %d MiB (%v), want InvalidArgument", name, v, m, err)
		}
	}
}
