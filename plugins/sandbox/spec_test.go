package sandbox

import (
	"testing"

	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

type nsInstance struct {
	fakeInstance
	ns []specs.LinuxNamespace
}

func (i *nsInstance) PodNamespaces() []specs.LinuxNamespace { return i.ns }

func TestPodSpec(t *testing.T) {
	sb := &Sandbox{ID: "sb1", Config: &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: "web", Namespace: "prod", Uid: "u1"},
		Hostname:     "web-0",
		LogDirectory: "/var/log/pods/u1",
		Annotations:  map[string]string{"team": "a"},
		Linux:        &runtime.LinuxPodSandboxConfig{Resources: &runtime.LinuxContainerResources{MemoryLimitInBytes: 1 << 30}},
	}}
	inst := &nsInstance{ns: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/run/netns/cni-1"}}}
	a, err := typeurl.MarshalAny(podSpec(sb, inst))
	if err != nil {
		t.Fatal(err)
	}
	if a.GetTypeUrl() != "types.containerd.io/opencontainers/runtime-spec/1/Spec" {
		t.Fatalf("type URL %q", a.GetTypeUrl())
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		t.Fatal(err)
	}
	spec := v.(*specs.Spec)
	for k, want := range map[string]string{
		"team": "a", annContainerType: "sandbox", annSandboxID: "sb1", annSandboxName: "web",
		annSandboxNamespace: "prod", annSandboxUID: "u1", annSandboxLogDir: "/var/log/pods/u1",
		annSandboxMemoryLimit: "1073741824",
	} {
		if got := spec.Annotations[k]; got != want {
			t.Errorf("annotation %s = %q, want %q", k, got, want)
		}
	}
	if spec.Hostname != "web-0" || len(spec.Linux.Namespaces) != 1 || spec.Linux.Namespaces[0].Path != "/run/netns/cni-1" {
		t.Fatalf("spec %+v", spec)
	}
	// A kind with no namespaces on the node names none.
	if ns := podSpec(sb, &fakeInstance{}).Linux.Namespaces; len(ns) != 0 {
		t.Fatalf("namespaces %v", ns)
	}
}
