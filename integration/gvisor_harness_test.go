//go:build e2e || bench || conformance || pkg || kube

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The gVisor handlers: kuasar-gvisor on containerd-kuasar, and the stock
// baseline, stock containerd with gVisor's own shim (containerd-shim-runsc-v1)
// behind a runsc handler, as gVisor documents it.
const (
	kuasarGVisor = "kuasar-gvisor"
	stockGVisor  = "runsc"
)

// runscNullNetns is the file runsc pins an empty network namespace on, in
// the root it shares between sandboxes, for their gofers: node-wide state
// like the keeper, not a pod's. The leak check allows it; cleanup unmounts
// it.
const runscNullNetns = "null-netns"

// kuasarRunscRoot is kuasar-gvisor's runsc state directory in a daemon.
func (d *Daemon) kuasarRunscRoot() string {
	return filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-appkernel", "runsc")
}

// stockRunscRoot is the runsc state directory of the stock gVisor shim.
func (d *Daemon) stockRunscRoot() string { return filepath.Join(d.Dir, "runsc") }

// setupStockGVisor gives a stock daemon a runsc handler: gVisor's shim
// running the same runsc as kuasar-gvisor, on the same platform, with its
// state under the daemon's root. The shim runs with its defaults, so one
// shim per container (the pod's pause included): its grouping option (one
// shim per pod) cannot delete tasks on containerd 2.4 (its Shutdown
// answers nil while it serves other containers, which containerd's ttrpc
// refuses: "marshal called with nil"), and pods never stop.
func (d *Daemon) setupStockGVisor() error {
	runscToml := filepath.Join(d.Dir, "runsc.toml")
	cfg := fmt.Sprintf("binary_name = %q\nroot = %q\n\n[runsc_config]\n  platform = \"systrap\"\n",
		filepath.Join(stockBinDir, "runsc"), d.stockRunscRoot())
	if err := os.WriteFile(runscToml, []byte(cfg), 0o644); err != nil {
		return err
	}
	f, err := os.OpenFile(d.Config, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, `
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runsc]
  runtime_type = "io.containerd.runsc.v1"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runsc.options]
    TypeUrl = "io.containerd.runsc.v1.options"
    ConfigPath = %q
`, runscToml)
	return err
}

// checkGVisorLeaks reports what gVisor left of the daemon's pods: state in
// either runsc root (sandboxes, containers, control sockets) and the pod
// records of kuasar-gvisor. Its processes (sentries and gofers name the
// root in their command lines) are found by the generic check.
func (d *Daemon) checkGVisorLeaks() {
	t := d.t
	t.Helper()
	// The stock shim keeps a root per containerd namespace.
	roots := []string{d.kuasarRunscRoot()}
	if entries, err := os.ReadDir(d.stockRunscRoot()); err == nil {
		for _, e := range entries {
			roots = append(roots, filepath.Join(d.stockRunscRoot(), e.Name()))
		}
	}
	for _, root := range roots {
		entries, _ := os.ReadDir(root)
		var left []string
		for _, e := range entries {
			if e.Name() != runscNullNetns {
				left = append(left, e.Name())
			}
		}
		if len(left) > 0 {
			t.Errorf("leak: runsc state in %s: %v", root, left)
		}
	}
	dir := filepath.Join(d.Dir, "state", "io.containerd.sandbox.controller.v1.kuasar-appkernel", "sandboxes")
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("leak: %s still holds %v", dir, names)
	}
}

// isRunscNullNetns reports whether a mount is runsc's node-wide null
// network namespace.
func isRunscNullNetns(mountpoint string) bool {
	return filepath.Base(mountpoint) == runscNullNetns
}

// gvisorProcs lists a daemon's gVisor processes on the node: sentries
// (runsc-sandbox), gofers (runsc-gofer), and the sentries' children
// (systrap's stub processes).
func gvisorProcs(d *Daemon) []proc {
	var out []proc
	sentries := map[int]bool{}
	all := allProcs()
	for _, p := range all {
		if (strings.HasPrefix(p.Cmdline, "runsc-sandbox") || strings.HasPrefix(p.Cmdline, "runsc-gofer")) && strings.Contains(p.Cmdline, d.Dir) {
			out = append(out, p)
			if strings.HasPrefix(p.Cmdline, "runsc-sandbox") {
				sentries[p.Pid] = true
			}
		}
	}
	for _, p := range all {
		if sentries[p.PPid] && !strings.HasPrefix(p.Cmdline, "runsc-") {
			out = append(out, p)
		}
	}
	return out
}
