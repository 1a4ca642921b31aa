package sandbox

import (
	"os"
	"path/filepath"
	"testing"

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
	dir := t.TempDir()
	sb := &Sandbox{
		Config:      &runtime.PodSandboxConfig{Hostname: "pod-a", DnsConfig: &runtime.DNSConfig{Servers: []string{"10.0.0.10"}}},
		CRIRootDir:  filepath.Join(dir, "root"),
		CRIStateDir: filepath.Join(dir, "state"),
	}
	if err := WritePodFiles(sb); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{"hostname": "pod-a\n", "resolv.conf": "nameserver 10.0.0.10\n"} {
		if b, _ := os.ReadFile(filepath.Join(sb.CRIRootDir, file)); string(b) != want {
			t.Errorf("%s = %q, want %q", file, b, want)
		}
	}
	if err := RemovePodFiles(sb); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sb.CRIRootDir); !os.IsNotExist(err) {
		t.Errorf("pod files left: %v", err)
	}
}
