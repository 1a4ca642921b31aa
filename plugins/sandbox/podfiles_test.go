package sandbox

import (
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestResolvConf(t *testing.T) {
	tests := []struct {
		servers, searches, options []string
		want                       string
	}{
		{nil, nil, nil, ""},
		{[]string{"10.0.0.10", "8.8.8.8"}, []string{"ns.svc.cluster.local", "svc.cluster.local"}, []string{"ndots:5"},
			"search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\nnameserver 8.8.8.8\noptions ndots:5\n"},
	}
	for _, tt := range tests {
		if got := ResolvConf(tt.servers, tt.searches, tt.options); got != tt.want {
			t.Errorf("ResolvConf = %q, want %q", got, tt.want)
		}
	}
}

func TestWritePodFiles(t *testing.T) {
	sb := &Sandbox{
		Config: &runtime.PodSandboxConfig{Hostname: "pod-a", DnsConfig: &runtime.DNSConfig{Servers: []string{"10.0.0.10"}}},
		Dir:    t.TempDir(),
	}
	if sb.hasPodFiles() {
		t.Fatal("pod files before they were written")
	}
	if err := WritePodFiles(sb); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{"hostname": "pod-a\n", "resolv.conf": "nameserver 10.0.0.10\n"} {
		if b, _ := os.ReadFile(sb.PodFile(file)); string(b) != want {
			t.Errorf("%s = %q, want %q", file, b, want)
		}
	}
	if !sb.hasPodFiles() {
		t.Fatal("pod files missing after write")
	}
	if err := RemovePodFiles(sb); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sb.podFilesDir()); !os.IsNotExist(err) {
		t.Errorf("pod files left: %v", err)
	}
}

func TestAddPodMounts(t *testing.T) {
	cri := map[string]string{criContainerType: "container"}
	defaultShm := specs.Mount{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid"}}
	hostsVolume := specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/kubelet/pods/x/etc-hosts"}
	nodeIPC := &runtime.PodSandboxConfig{Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
		NamespaceOptions: &runtime.NamespaceOption{Ipc: runtime.NamespaceMode_NODE}}}}
	tests := []struct {
		name     string
		config   *runtime.PodSandboxConfig
		shm      string
		spec     *specs.Spec
		want     map[string]string // destination -> source
		readOnly bool
	}{
		{"pod files and shm", &runtime.PodSandboxConfig{}, "/sb/shm",
			&specs.Spec{Annotations: cri, Mounts: []specs.Mount{defaultShm}},
			map[string]string{"/etc/hostname": "/sb/etc/hostname", "/etc/hosts": "/sb/etc/hosts", "/etc/resolv.conf": "/sb/etc/resolv.conf", "/dev/shm": "/sb/shm"}, false},
		{"kubelet's hosts kept", &runtime.PodSandboxConfig{}, "",
			&specs.Spec{Annotations: cri, Mounts: []specs.Mount{hostsVolume, defaultShm}},
			map[string]string{"/etc/hostname": "/sb/etc/hostname", "/etc/hosts": hostsVolume.Source, "/etc/resolv.conf": "/sb/etc/resolv.conf", "/dev/shm": "shm"}, false},
		{"read-only rootfs", &runtime.PodSandboxConfig{}, "",
			&specs.Spec{Annotations: cri, Root: &specs.Root{Readonly: true}},
			map[string]string{"/etc/hostname": "/sb/etc/hostname", "/etc/hosts": "/sb/etc/hosts", "/etc/resolv.conf": "/sb/etc/resolv.conf"}, true},
		{"node's IPC keeps its shm", nodeIPC, "/sb/shm",
			&specs.Spec{Annotations: cri, Mounts: []specs.Mount{{Destination: "/dev/shm", Type: "bind", Source: "/dev/shm"}}},
			map[string]string{"/etc/hostname": "/sb/etc/hostname", "/etc/hosts": "/sb/etc/hosts", "/etc/resolv.conf": "/sb/etc/resolv.conf", "/dev/shm": "/dev/shm"}, false},
		{"not a CRI container", &runtime.PodSandboxConfig{}, "/sb/shm",
			&specs.Spec{Mounts: []specs.Mount{defaultShm}},
			map[string]string{"/dev/shm": "shm"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sb := &Sandbox{Dir: "/sb", ShmDir: tt.shm, Config: tt.config}
			AddPodMounts(sb, tt.spec)
			got := map[string]string{}
			for _, m := range tt.spec.Mounts {
				if _, dup := got[m.Destination]; dup {
					t.Errorf("two mounts at %s", m.Destination)
				}
				got[m.Destination] = m.Source
				if strings.HasPrefix(m.Source, "/sb/etc/") && slices.Contains(m.Options, "ro") != tt.readOnly {
					t.Errorf("%s options %v, read-only %v", m.Destination, m.Options, tt.readOnly)
				}
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("mounts %v, want %v", got, tt.want)
			}
		})
	}
}
