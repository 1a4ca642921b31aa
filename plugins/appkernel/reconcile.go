package appkernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// Reconcile removes what a daemon killed in the middle of an operation left
// of kuasar-gvisor without a record: sandboxes and containers in runsc's
// root that no record owns (runsc delete ends their sentries and gofers and
// removes their host cgroups), then gVisor processes of this root that no
// runsc state names (a runsc create killed before it recorded its
// sandbox).
func (k *kind) Reconcile(ctx context.Context, owned sandbox.Owned) error {
	ownedSandbox := map[string]bool{}
	ownedContainer := map[string]bool{}
	for _, sb := range owned.Sandboxes {
		ownedSandbox[sb.ID] = true
		ownedContainer[sb.ID] = true // the root container
		for _, c := range owned.Containers[sb.ID] {
			ownedContainer[c.ID] = true
		}
	}
	states, err := listState(k.root)
	if err != nil {
		return err
	}
	bin, err := k.runscBinary()
	if err != nil {
		if len(states) > 0 {
			return fmt.Errorf("runsc is needed to remove what no record owns: %w", err)
		}
		return nil
	}
	var errs []error
	// Subcontainers first, then the sandboxes they are in.
	for _, roots := range []bool{false, true} {
		for _, s := range states {
			if (s.Container == s.Sandbox) != roots || ownedContainer[s.Container] {
				continue
			}
			log.G(ctx).WithField("container", s.Container).WithField("sandbox", s.Sandbox).Warn("removing a gVisor container no record owns (left by a daemon that was killed)")
			cli := &runscCLI{path: bin, flags: []string{"--root=" + k.root}}
			if _, err := cli.run(ctx, "delete", "--force", s.Container); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for _, pid := range k.strayProcesses(ownedSandbox) {
		log.G(ctx).WithField("pid", pid).Warn("killing a gVisor process of no recorded sandbox")
		if err := proc.Signal(pid, proc.StartTime(pid), unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, err)
		}
	}
	if err := k.removeStrayFiles(ctx, ownedSandbox, ownedContainer); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeStrayFiles removes what a runsc create killed before it recorded
// its state left in runsc's root: control sockets of sandboxes, and lock
// files of containers (a subcontainer's too, in a sandbox that lives on),
// that no state or record names.
func (k *kind) removeStrayFiles(ctx context.Context, ownedSandbox, ownedContainer map[string]bool) error {
	states, err := listState(k.root)
	if err != nil {
		return err
	}
	recorded := map[string]bool{}
	for _, s := range states {
		recorded[s.Container+"_sandbox:"+s.Sandbox] = true
	}
	entries, err := os.ReadDir(k.root)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, "runsc-") && strings.HasSuffix(name, ".sock"):
			sandbox := strings.TrimSuffix(strings.TrimPrefix(name, "runsc-"), ".sock")
			if recorded[sandbox+"_sandbox:"+sandbox] || ownedSandbox[sandbox] {
				continue
			}
		case strings.HasSuffix(name, ".lock"):
			base := strings.TrimSuffix(name, ".lock")
			cid, _, ok := strings.Cut(base, "_sandbox:")
			if !ok || recorded[base] || ownedContainer[cid] {
				continue
			}
		default:
			continue
		}
		log.G(ctx).WithField("file", name).Warn("removing what a killed runsc create left")
		if err := os.Remove(filepath.Join(k.root, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// strayProcesses lists the sentries and gofers of this runsc root whose
// sandbox is not in owned and that runsc recorded no state for.
func (k *kind) strayProcesses(owned map[string]bool) []int {
	states, _ := listState(k.root)
	recorded := map[string]bool{}
	for _, s := range states {
		recorded[s.Sandbox] = true
	}
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		id, ok := gvisorProcessSandbox(strings.Split(string(b), "\x00"), k.root, k.env.State)
		if ok && !owned[id] && !recorded[id] {
			out = append(out, pid)
		}
	}
	return out
}

// gvisorProcessSandbox tells, from a command line, whether it is a sentry
// or gofer of runsc root (runsc-sandbox or runsc-gofer with --root=root)
// and, from its bundle (under state's sandbox directories), the sandbox it
// belongs to.
func gvisorProcessSandbox(argv []string, root, state string) (string, bool) {
	if len(argv) == 0 || (argv[0] != "runsc-sandbox" && argv[0] != "runsc-gofer") {
		return "", false
	}
	var inRoot bool
	var bundle string
	for i, a := range argv {
		switch {
		case a == "--root="+root:
			inRoot = true
		case strings.HasPrefix(a, "--bundle="):
			bundle = strings.TrimPrefix(a, "--bundle=")
		case a == "--bundle" && i+1 < len(argv):
			bundle = argv[i+1]
		}
	}
	prefix := state + "/sandboxes/"
	if !inRoot || !strings.HasPrefix(bundle, prefix) {
		return "", false
	}
	id, _, _ := strings.Cut(strings.TrimPrefix(bundle, prefix), "/")
	return id, id != ""
}
