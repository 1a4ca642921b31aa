//go:build e2e || bench

package integration

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// needQEMU says why the microVM tests cannot run here (qemu-system-x86 is
// one of the packages `make test` installs, so this only happens when the
// tests are run by hand on a machine without it).
func needQEMU(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/usr/bin/qemu-system-x86_64"); err != nil {
		t.Skipf("skipping the kuasar-vmm test: qemu-system-x86_64 is not installed (make deps installs it): %v", err)
	}
}

// vmmPod starts a daemon and a kuasar-vmm pod.
func vmmPod(t *testing.T, name string, o daemonOptions) (*Daemon, string, *runtimeapi.PodSandboxConfig) {
	t.Helper()
	needQEMU(t)
	d := startDaemon(t, o)
	cfg := d.podConfig(name)
	cfg.DnsConfig = &runtimeapi.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"e2e.svc.cluster.local"}}
	pod := d.runPod(t, kuasarVMM, cfg)
	// The start path the run asked for (KUASAR_VMM_TEMPLATE) is the one
	// the pod took.
	want := map[string]string{"": "template", "auto": "template", "off": "cold"}[os.Getenv("KUASAR_VMM_TEMPLATE")]
	if got := d.vmInfo(t, pod).Boot; want != "" && !strings.Contains(o.vmmConfig, "template =") && got != want {
		t.Fatalf("the pod VM started by %q, want %q (KUASAR_VMM_TEMPLATE=%q)", got, want, os.Getenv("KUASAR_VMM_TEMPLATE"))
	}
	return d, pod, cfg
}

// vmInfo is the pod's status info from kuasar-vmm.
type vmInfo struct {
	Accel     string `json:"accel"`
	Boot      string `json:"boot"`
	Template  string `json:"template"`
	VMPid     int    `json:"vmPid"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memoryMiB"`
}

func (d *Daemon) vmInfo(t *testing.T, pod string) vmInfo {
	t.Helper()
	r, err := d.RS.PodSandboxStatus(ctx(t), &runtimeapi.PodSandboxStatusRequest{PodSandboxId: pod, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var info vmInfo
	if err := json.Unmarshal([]byte(r.Info["kuasar"]), &info); err != nil || info.VMPid == 0 {
		t.Fatalf("pod info %q: %v", r.Info, err)
	}
	return info
}
