package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// modules loads the kernel modules of the image: the early ones before the
// channel opens, the late ones while the agent already serves.
type modules struct {
	root  string // "/lib/modules"
	load  func(path string) error
	mu    sync.Mutex
	done  chan struct{}
	errs  []string
	early []guest.Module
	late  []guest.Module
}

func newModules(list []guest.Module) *modules {
	m := &modules{root: "/lib/modules", load: finitModule, done: make(chan struct{})}
	for _, mod := range list {
		if mod.Early {
			m.early = append(m.early, mod)
		} else {
			m.late = append(m.late, mod)
		}
	}
	return m
}

// readModules reads the image's module list (none if there is no list).
func readModules(path string) ([]guest.Module, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return guest.ParseModules(b)
}

// loadEarly loads the modules the channel needs; failing is fatal.
func (m *modules) loadEarly(ctx context.Context) error {
	for _, mod := range m.early {
		if err := m.loadOne(ctx, mod); err != nil {
			return err
		}
	}
	return nil
}

// loadLate loads the other modules; failures are recorded for Check.
func (m *modules) loadLate(ctx context.Context) {
	defer close(m.done)
	for _, mod := range m.late {
		if err := m.loadOne(ctx, mod); err != nil {
			log.G(ctx).WithError(err).Warn("kernel module not loaded")
			m.mu.Lock()
			m.errs = append(m.errs, err.Error())
			m.mu.Unlock()
		}
	}
}

func (m *modules) loadOne(ctx context.Context, mod guest.Module) error {
	start := time.Now()
	if err := m.load(filepath.Join(m.root, mod.Path)); err != nil {
		return fmt.Errorf("loading %s: %w", mod.Path, err)
	}
	log.G(ctx).WithField("module", filepath.Base(mod.Path)).WithField("took", time.Since(start)).Debug("module loaded")
	return nil
}

// status reports whether the late modules are done, and what failed.
func (m *modules) status() (bool, []string) {
	select {
	case <-m.done:
	default:
		return false, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return true, append([]string(nil), m.errs...)
}

// wait blocks until the late modules are loaded (for calls that need them:
// mounting a share, configuring the NIC).
func (m *modules) wait(ctx context.Context) error {
	select {
	case <-m.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finitModule loads a module file; one already loaded is fine.
func finitModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}
