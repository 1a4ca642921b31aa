package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/runcutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
)

// runcTimeout bounds one runc command. Commands are not cut short when the
// call that asked for them is (a create killed half way leaves a half
// container): they run to the end or to this bound.
const runcTimeout = 2 * time.Minute

// runcCLI runs the guest's runc binary. Every runc is a child the reaper
// leaves to os/exec.
type runcCLI struct {
	bin    *runcBinary
	root   string // --root: runc's state, on a guest tmpfs
	reaper *reaper.Reaper
}

// runcBinary is the runc the agent runs: the image's, or its sealed copy
// (see sealedBinary), made while the agent already serves.
type runcBinary struct {
	ready chan struct{}
	path  string
	file  *os.File // the sealed copy path names, kept open
}

// plainRunc is the runc binary at path, as it is.
func plainRunc(path string) *runcBinary {
	b := &runcBinary{ready: make(chan struct{}), path: path}
	close(b.ready)
	return b
}

// sealRunc returns the runc binary at path, to be copied into a sealed
// memfd by seal.
func sealRunc(path string) *runcBinary {
	return &runcBinary{ready: make(chan struct{}), path: path}
}

// seal makes the sealed copy and removes the file (the initramfs holds it
// in RAM; the memfd does now). Without a copy runc runs from the file.
func (b *runcBinary) seal(ctx context.Context) {
	defer close(b.ready)
	start := time.Now()
	path, f, err := sealedBinary(b.path)
	if err != nil {
		log.G(ctx).WithError(err).Warn("runc runs from its file (every runc init copies it)")
		return
	}
	_ = os.Remove(b.path)
	b.path, b.file = path, f
	log.G(ctx).WithField("took", time.Since(start)).Debug("runc sealed in a memfd")
}

// Path returns the path to execute, once it is known.
func (b *runcBinary) Path(ctx context.Context) (string, error) {
	select {
	case <-b.ready:
		return b.path, nil
	default:
	}
	select {
	case <-b.ready:
		return b.path, nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// stdio is what a runc command that leaves a process behind (create, exec)
// hands to it: the process's standard streams.
type stdio struct {
	in, out, err *os.File
}

// command returns a runc command line; logPath, if set, gets runc's own
// log as JSON.
func (r *runcCLI) command(ctx context.Context, logPath string, args ...string) (*exec.Cmd, error) {
	path, err := r.bin.Path(ctx)
	if err != nil {
		return nil, err
	}
	global := []string{"--root", r.root}
	if logPath != "" {
		global = append(global, "--log", logPath, "--log-format", "json")
	}
	return exec.CommandContext(ctx, path, append(global, args...)...), nil
}

// run executes a runc command that leaves nothing behind and returns its
// output, or an error with runc's message and its errdefs class.
func (r *runcCLI) run(ctx context.Context, stdin io.Reader, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), runcTimeout)
	defer cancel()
	cmd, err := r.command(ctx, "", args...)
	if err != nil {
		return nil, err
	}
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := r.reaper.Exec(cmd); err != nil {
		return nil, fmt.Errorf("runc %s: %w", args[0], runcutil.Failure(stderr.String(), err))
	}
	return stdout.Bytes(), nil
}

// spawn executes runc create or exec, which start a process with io as its
// streams and exit; runc's own messages go to logPath, and its error is
// read back from there.
func (r *runcCLI) spawn(ctx context.Context, io stdio, logPath string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), runcTimeout)
	defer cancel()
	cmd, err := r.command(ctx, logPath, args...)
	if err != nil {
		return err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = io.in, io.out, io.err
	if err := r.reaper.Exec(cmd); err != nil {
		msg := runcutil.LogError(logPath)
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("runc %s: %w", args[0], runcutil.Failure(msg, err))
	}
	return nil
}

// ps lists the guest pids of a container's processes.
func (r *runcCLI) ps(ctx context.Context, id string) ([]int, error) {
	out, err := r.run(ctx, nil, "ps", "--format", "json", id)
	if err != nil {
		return nil, err
	}
	return runcutil.ParsePs(out)
}

// runcSeals are the seals runc's own clone of its binary has: a runc
// running from a memfd sealed so is not copied again (runc 1.1's
// CVE-2019-5736 protection re-executes itself from a fresh copy at every
// runc init otherwise).
const runcSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE

// sealedBinary copies the binary at path into a sealed memfd, once, and
// returns a path that executes it (the agent's /proc/PID/fd/N) and the
// file, to keep open for as long as the path is used. runc started from it
// skips the copy and the re-execution of every runc init: under TCG that
// is most of a container's create (the copy's pages are new at every run,
// so TCG translates the whole of runc init again each time), and the
// pages of one copy are shared by every runc. The copy cannot be written
// (F_SEAL_WRITE), as runc's own copy; on disk the binary is removed
// afterwards: the initramfs holds it in RAM and the memfd does now.
func sealedBinary(path string) (string, *os.File, error) {
	src, err := os.Open(path)
	if err != nil {
		return "", nil, err
	}
	defer src.Close()
	fd, err := unix.MemfdCreate(filepath.Base(path), unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return "", nil, fmt.Errorf("memfd for %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+filepath.Base(path))
	if _, err := io.Copy(f, src); err != nil {
		f.Close()
		return "", nil, fmt.Errorf("copying %s: %w", path, err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, runcSeals); err != nil {
		f.Close()
		return "", nil, fmt.Errorf("sealing the copy of %s: %w", path, err)
	}
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd()), f, nil
}
