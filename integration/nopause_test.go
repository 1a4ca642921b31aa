//go:build e2e

package integration

import (
	"strings"
	"testing"
)

// TestNoPauseNoShim runs a kuasar-runc pod next to a stock runc pod on the
// same daemon, and checks what each costs in processes: the stock pod a
// shim and a pause; the kuasar-runc pod nothing but its workload.
func TestNoPauseNoShim(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	kCfg, sCfg := d.podConfig("kuasar"), d.podConfig("stock")
	kPod := d.runPod(t, kuasarRunc, kCfg)
	sPod := d.runPod(t, stockRunc, sCfg)
	kc := d.run(t, kPod, kCfg, ctrConfig("work", "sleep", "3600"))
	sc := d.run(t, sPod, sCfg, ctrConfig("work", "sleep", "3600"))

	// Both work the same from the outside.
	for _, c := range []string{kc, sc} {
		if out, _, code := d.execSync(t, c, "sh", "-c", "hostname; ip -o -4 addr show eth0 | wc -l"); code != 0 || !strings.HasSuffix(out, "1\n") {
			t.Fatalf("container %s: %q (exit %d)", short(c), out, code)
		}
	}

	kProcs := podProcesses(t, d, kPod)
	if len(kProcs) != 1 || kProcs[0].Comm != "sleep" {
		t.Fatalf("kuasar-runc pod processes = %+v, want only its workload", kProcs)
	}
	sProcs := podProcesses(t, d, sPod)
	hasPause := false
	for _, p := range sProcs {
		hasPause = hasPause || p.Comm == "pause"
	}
	if !hasPause {
		t.Fatalf("stock pod has no pause process (%+v): the check cannot tell the two apart", sProcs)
	}
	shims := shimsOf(d)
	if len(shims) != 1 {
		t.Fatalf("shims serving the daemon = %+v, want exactly the stock pod's", shims)
	}
	for _, s := range shims {
		if strings.Contains(s.Cmdline, kPod) {
			t.Fatalf("a shim serves the kuasar-runc pod: %s", s.Cmdline)
		}
	}
	// The workload's parent is the node-wide keeper, not a per-pod process.
	kPid := containerPid(t, d, kc)
	parent, _ := readProc(kProcs[0].PPid)
	if kProcs[0].Pid != kPid || parent.Comm != "kuasar-keeper" {
		t.Fatalf("kuasar-runc workload %d parent = %+v, want the keeper", kPid, parent)
	}
	t.Logf("kuasar-runc pod: %d process(es) %v; stock pod: %d processes + %d shim", len(kProcs), comms(kProcs), len(sProcs), len(shims))
}
