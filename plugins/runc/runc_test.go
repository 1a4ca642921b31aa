package runc

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

func testPod(st podState, ns *runtime.NamespaceOption) *containers {
	cfg := &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{NamespaceOptions: ns}}}
	p := &pod{sb: &sandbox.Sandbox{Config: cfg}, st: st}
	return &containers{pod: p}
}

func TestAdaptSpec(t *testing.T) {
	full := podState{
		Namespaces: map[nsutil.Kind]string{nsutil.Net: "/run/netns/cni-1", nsutil.IPC: "/s/ns/ipc", nsutil.UTS: "/s/ns/uts"},
		HolderPid:  4242,
	}
	podPid := &runtime.NamespaceOption{Pid: runtime.NamespaceMode_POD}
	all := []specs.LinuxNamespace{{Type: "network", Path: "/proc/0/ns/net"}, {Type: "ipc", Path: "/proc/0/ns/ipc"}, {Type: "uts", Path: "/proc/0/ns/uts"}, {Type: "pid", Path: "/proc/0/ns/pid"}, {Type: "mount"}}
	const absent = "absent"
	tests := []struct {
		name  string
		st    podState
		ns    *runtime.NamespaceOption
		in    []specs.LinuxNamespace
		want  map[specs.LinuxNamespaceType]string // absent: the entry is dropped
		error error
	}{
		{"pod namespaces", full, podPid, all,
			map[specs.LinuxNamespaceType]string{"network": "/run/netns/cni-1", "ipc": "/s/ns/ipc", "uts": "/s/ns/uts", "pid": "/proc/4242/ns/pid", "mount": ""}, nil},
		{"own pid namespace untouched", full, nil,
			[]specs.LinuxNamespace{{Type: "pid"}, {Type: "network", Path: "/proc/0/ns/net"}},
			map[specs.LinuxNamespaceType]string{"pid": "", "network": "/run/netns/cni-1"}, nil},
		{"target container's pid namespace untouched", full, nil,
			[]specs.LinuxNamespace{{Type: "pid", Path: "/proc/77/ns/pid"}},
			map[specs.LinuxNamespaceType]string{"pid": "/proc/77/ns/pid"}, nil},
		{"pod pid namespace missing", podState{Namespaces: full.Namespaces}, podPid,
			[]specs.LinuxNamespace{{Type: "pid", Path: "/proc/0/ns/pid"}}, nil, errdefs.ErrInvalidArgument},
		{"pod ipc missing", podState{Namespaces: map[nsutil.Kind]string{nsutil.Net: "/n"}}, nil,
			[]specs.LinuxNamespace{{Type: "ipc", Path: "/proc/0/ns/ipc"}}, nil, errdefs.ErrInvalidArgument},
		// Host namespaces: CRI asks for the sandbox's, which are the node's.
		{"node's ipc", podState{Namespaces: map[nsutil.Kind]string{nsutil.Net: "/n", nsutil.UTS: "/u"}, HolderPid: 9},
			&runtime.NamespaceOption{Ipc: runtime.NamespaceMode_NODE, Pid: runtime.NamespaceMode_POD}, all,
			map[specs.LinuxNamespaceType]string{"network": "/n", "ipc": absent, "uts": "/u", "pid": "/proc/9/ns/pid", "mount": ""}, nil},
		{"node's network and hostname", podState{Namespaces: map[nsutil.Kind]string{nsutil.IPC: "/i"}, HolderPid: 7},
			&runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE, Pid: runtime.NamespaceMode_POD}, all,
			map[specs.LinuxNamespaceType]string{"network": absent, "ipc": "/i", "uts": absent, "pid": "/proc/7/ns/pid", "mount": ""}, nil},
		{"node's pid", full, &runtime.NamespaceOption{Pid: runtime.NamespaceMode_NODE}, all,
			map[specs.LinuxNamespaceType]string{"network": "/run/netns/cni-1", "ipc": "/s/ns/ipc", "uts": "/s/ns/uts", "pid": absent, "mount": ""}, nil},
		{"user namespace", full, nil,
			[]specs.LinuxNamespace{{Type: "user", Path: "/proc/0/ns/user"}}, nil, errdefs.ErrNotImplemented},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := &specs.Spec{Linux: &specs.Linux{Namespaces: slices.Clone(tt.in)}}
			err := testPod(tt.st, tt.ns).adaptSpec(spec)
			if tt.error != nil {
				if !errors.Is(err, tt.error) {
					t.Fatalf("err = %v, want %v", err, tt.error)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := map[specs.LinuxNamespaceType]string{}
			for _, ns := range spec.Linux.Namespaces {
				got[ns.Type] = ns.Path
			}
			for typ, want := range tt.want {
				path, ok := got[typ]
				if !ok {
					path = absent
				}
				if path != want {
					t.Errorf("%s namespace path %q, want %q", typ, path, want)
				}
			}
			if len(got) > len(tt.want) {
				t.Errorf("namespaces %v, want %v", got, tt.want)
			}
		})
	}
	if err := testPod(full, nil).adaptSpec(&specs.Spec{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("spec without linux section: %v", err)
	}
}

func TestSystemdCgroupsPath(t *testing.T) {
	tests := map[string]bool{
		"kubepods-besteffort-pod1.slice:cri-containerd:abc": true,
		"/kubepods/besteffort/pod1/abc":                     false,
		"abc":                                               false,
		"a:b:c":                                             false,
	}
	for p, want := range tests {
		if got := isSystemdCgroupsPath(p); got != want {
			t.Errorf("isSystemdCgroupsPath(%q) = %v", p, got)
		}
	}
	rc := (&runcCLI{path: "runc", root: "/r"}).forContainer(ctrState{Systemd: true})
	if got := strings.Join(rc.global(""), " "); got != "--root /r --systemd-cgroup" {
		t.Fatalf("global flags %q", got)
	}
}
