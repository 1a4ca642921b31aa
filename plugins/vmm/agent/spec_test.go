package agent

import (
	"bufio"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

func TestGuestSpec(t *testing.T) {
	bundle := guest.BundleDir("c1")
	podNS := map[nsutil.Kind]string{nsutil.IPC: guest.PodNSDir + "/ipc", nsutil.UTS: guest.PodNSDir + "/uts"}
	sharedPID := map[nsutil.Kind]string{nsutil.IPC: guest.PodNSDir + "/ipc", nsutil.UTS: guest.PodNSDir + "/uts", nsutil.PID: guest.PodNSDir + "/pid"}
	base := func() *specs.Spec {
		return &specs.Spec{
			Process: &specs.Process{Args: []string{"sh"}, ApparmorProfile: "cri-containerd.apparmor.d", SelinuxLabel: "system_u:system_r:container_t:s0"},
			Root:    &specs.Root{Path: bundle + "/rootfs"},
			Hooks:   &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/nvidia-hook"}}},
			Linux: &specs.Linux{
				CgroupsPath: "/kuasar/c1",
				MountLabel:  "system_u:object_r:container_file_t:s0",
				Namespaces: []specs.LinuxNamespace{
					{Type: specs.MountNamespace},
					{Type: specs.NetworkNamespace, Path: "/proc/0/ns/net"},
					{Type: specs.IPCNamespace, Path: "/proc/0/ns/ipc"},
					{Type: specs.UTSNamespace, Path: guest.PodNSDir + "/uts"},
					{Type: specs.PIDNamespace},
				},
			},
		}
	}
	for _, tc := range []struct {
		name     string
		edit     func(*specs.Spec)
		env      specEnv
		terminal bool
		check    func(*testing.T, *specs.Spec)
		err      func(error) bool
	}{
		{
			name: "translated spec",
			env:  specEnv{podNS: podNS, cgroupParent: guest.CgroupParent},
			check: func(t *testing.T, s *specs.Spec) {
				want := []specs.LinuxNamespace{
					{Type: specs.MountNamespace},
					{Type: specs.IPCNamespace, Path: guest.PodNSDir + "/ipc"},
					{Type: specs.UTSNamespace, Path: guest.PodNSDir + "/uts"},
					{Type: specs.PIDNamespace},
				}
				if len(s.Linux.Namespaces) != len(want) {
					t.Fatalf("namespaces %v, want %v", s.Linux.Namespaces, want)
				}
				for i := range want {
					if s.Linux.Namespaces[i] != want[i] {
						t.Errorf("namespace %d: %v, want %v", i, s.Linux.Namespaces[i], want[i])
					}
				}
				if s.Hooks != nil || s.Process.ApparmorProfile != "" || s.Process.SelinuxLabel != "" || s.Linux.MountLabel != "" {
					t.Errorf("host-only settings kept: hooks %v, apparmor %q, selinux %q %q", s.Hooks, s.Process.ApparmorProfile, s.Process.SelinuxLabel, s.Linux.MountLabel)
				}
				if s.Linux.CgroupsPath != "/kuasar/c1" || s.Root.Path != bundle+"/rootfs" || s.Process.Terminal {
					t.Errorf("cgroups %q, root %q, terminal %v", s.Linux.CgroupsPath, s.Root.Path, s.Process.Terminal)
				}
			},
		},
		{
			name:     "relative root, no cgroups path, terminal, security modules on",
			edit:     func(s *specs.Spec) { s.Root.Path = "rootfs"; s.Linux.CgroupsPath = "" },
			env:      specEnv{podNS: podNS, cgroupParent: "/pods", apparmor: true, selinux: true},
			terminal: true,
			check: func(t *testing.T, s *specs.Spec) {
				if s.Root.Path != bundle+"/rootfs" || s.Linux.CgroupsPath != "/pods/c1" || !s.Process.Terminal {
					t.Errorf("root %q, cgroups %q, terminal %v", s.Root.Path, s.Linux.CgroupsPath, s.Process.Terminal)
				}
				if s.Process.ApparmorProfile == "" || s.Linux.MountLabel == "" {
					t.Error("security settings dropped though the guest enforces them")
				}
			},
		},
		{
			name: "systemd cgroups path",
			edit: func(s *specs.Spec) { s.Linux.CgroupsPath = "kubepods-pod1.slice:cri-containerd:c1" },
			env:  specEnv{podNS: podNS, cgroupParent: guest.CgroupParent},
			check: func(t *testing.T, s *specs.Spec) {
				if s.Linux.CgroupsPath != "/kuasar/c1" {
					t.Errorf("cgroups %q", s.Linux.CgroupsPath)
				}
			},
		},
		{
			name: "shared PID namespace",
			edit: func(s *specs.Spec) { s.Linux.Namespaces[4].Path = "/proc/0/ns/pid" },
			env:  specEnv{podNS: sharedPID, cgroupParent: guest.CgroupParent},
			check: func(t *testing.T, s *specs.Spec) {
				if p := s.Linux.Namespaces[len(s.Linux.Namespaces)-1]; p.Path != guest.PodNSDir+"/pid" {
					t.Errorf("pid namespace %v", p)
				}
			},
		},
		{
			name: "pod PID namespace the pod does not have",
			edit: func(s *specs.Spec) { s.Linux.Namespaces[4].Path = guest.PodNSDir + "/pid" },
			env:  specEnv{podNS: podNS},
			err:  errdefs.IsFailedPrecondition,
		},
		{
			name: "pod namespace of the wrong kind",
			edit: func(s *specs.Spec) { s.Linux.Namespaces[2].Path = guest.PodNSDir + "/uts" },
			env:  specEnv{podNS: podNS},
			err:  errdefs.IsFailedPrecondition,
		},
		{
			name: "no linux section",
			edit: func(s *specs.Spec) { s.Linux = nil },
			err:  errdefs.IsInvalidArgument,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := base()
			if tc.edit != nil {
				tc.edit(in)
			}
			got, err := guestSpec(in, "c1", bundle, tc.terminal, tc.env)
			if tc.err != nil {
				if !tc.err(err) {
					t.Fatalf("error %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, got)
			if in.Hooks == nil || len(in.Linux.Namespaces) != 5 {
				t.Error("the container's own spec was changed")
			}
		})
	}
}

func TestExecSpec(t *testing.T) {
	in := &specs.Process{Args: []string{"sh"}, ApparmorProfile: "p", SelinuxLabel: "l"}
	got := execSpec(in, true, specEnv{})
	if !got.Terminal || got.ApparmorProfile != "" || got.SelinuxLabel != "" || in.ApparmorProfile != "p" {
		t.Errorf("exec spec %+v from %+v", got, in)
	}
}

func TestFindMount(t *testing.T) {
	const mountinfo = `22 1 0:20 / / rw - rootfs rootfs rw
25 22 0:22 / /proc rw,nosuid - proc proc rw
40 22 0:33 / /run/kuasar/shared rw shared:1 - 9p kuasar rw,trans=virtio
41 22 0:34 / /run/kuasar/pod/shm rw - tmpfs shm rw
42 41 0:35 / /run/kuasar/pod/shm rw - tmpfs shm rw,size=1k
43 22 0:36 / /a\040b rw - tmpfs x rw
`
	for _, tc := range []struct {
		dir, fstype string
		ok          bool
	}{
		{"/run/kuasar/shared", "9p", true},
		{"/run/kuasar/pod/shm", "tmpfs", true},
		{"/a b", "tmpfs", true},
		{"/run/kuasar", "", false},
		{"/run/kuasar/shared/x", "", false},
	} {
		fstype, ok := findMount(bufio.NewScanner(strings.NewReader(mountinfo)), tc.dir)
		if fstype != tc.fstype || ok != tc.ok {
			t.Errorf("findMount(%q) = %q, %v; want %q, %v", tc.dir, fstype, ok, tc.fstype, tc.ok)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`: "/plain", `/a\040b`: "/a b", `/tab\011x`: "/tab\tx", `/back\134slash`: `/back\slash`,
		`/short\04`: `/short\04`, `/bad\9xx`: `/bad\9xx`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}
