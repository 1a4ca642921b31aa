package runc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/runcutil"
)

// runcCLI runs the OCI runtime binary (runc or a compatible one).
type runcCLI struct {
	path    string // resolved binary
	root    string // --root state directory
	systemd bool   // the container's cgroups are managed through systemd
}

// forContainer returns the CLI to use for a container: with
// --systemd-cgroup when its cgroups path has systemd's form.
func (r *runcCLI) forContainer(st ctrState) *runcCLI {
	c := *r
	c.systemd = st.Systemd
	return &c
}

// isSystemdCgroupsPath reports whether a spec's cgroups path has the
// "slice:prefix:name" form CRI uses with a systemd cgroup parent.
func isSystemdCgroupsPath(p string) bool {
	parts := strings.Split(p, ":")
	return len(parts) == 3 && strings.HasSuffix(parts[0], ".slice")
}

// global returns the global flags, with a JSON log file when logPath is set.
func (r *runcCLI) global(logPath string) []string {
	args := []string{"--root", r.root}
	if r.systemd {
		args = append(args, "--systemd-cgroup")
	}
	if logPath != "" {
		args = append(args, "--log", logPath, "--log-format", "json")
	}
	return args
}

// argv builds a full command line (for processes spawned by the keeper).
func (r *runcCLI) argv(logPath string, args ...string) []string {
	return append(append([]string{r.path}, r.global(logPath)...), args...)
}

// run executes a short runc command from the daemon and returns its
// output, or an error carrying runc's message.
func (r *runcCLI) run(ctx context.Context, stdin io.Reader, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.path, append(r.global(""), args...)...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s %s: %w", r.path, args[0], runcutil.Failure(stderr.String(), err))
	}
	return stdout.Bytes(), nil
}

// ps lists the pids of a container.
func (r *runcCLI) ps(ctx context.Context, id string) ([]int, error) {
	out, err := r.run(ctx, nil, "ps", "--format", "json", id)
	if err != nil {
		return nil, err
	}
	return runcutil.ParsePs(out)
}
