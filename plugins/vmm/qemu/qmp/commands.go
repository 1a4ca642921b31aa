package qmp

import (
	"context"
	"encoding/json"
	"fmt"
)

// Status is the reply of query-status.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"` // "running", "paused", "inmigrate", "postmigrate", "shutdown", ...
}

// QueryStatus returns the VM's run state.
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// Quit makes QEMU exit at once (the guest is not told).
func (c *Client) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if err != nil {
		// QEMU may close the socket before its reply is read.
		select {
		case <-c.done:
			return nil
		default:
		}
	}
	return err
}

// SystemPowerdown presses the VM's ACPI power button.
func (c *Client) SystemPowerdown(ctx context.Context) error {
	return c.Execute(ctx, "system_powerdown", nil, nil)
}

// Stop pauses the VM's CPUs.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the VM's CPUs (after Stop, -S, or an incoming migration).
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// DeviceAdd adds a device: props are its properties besides driver and
// id.
func (c *Client) DeviceAdd(ctx context.Context, driver, id string, props map[string]any) error {
	args := map[string]any{"driver": driver, "id": id}
	for k, v := range props {
		args[k] = v
	}
	return c.Execute(ctx, "device_add", args, nil)
}

// DeviceDel asks the guest to release a device and waits for QEMU's
// DEVICE_DELETED event (the guest must cooperate: PCIe hot-unplug).
func (c *Client) DeviceDel(ctx context.Context, id string) error {
	sub := c.Subscribe("DEVICE_DELETED")
	defer sub.Close()
	if err := c.Execute(ctx, "device_del", map[string]any{"id": id}, nil); err != nil {
		return err
	}
	_, err := sub.Wait(ctx, func(e Event) bool {
		var d struct {
			Device string `json:"device"`
		}
		return json.Unmarshal(e.Data, &d) == nil && d.Device == id
	})
	if err != nil {
		return fmt.Errorf("qmp device_del %s: waiting for DEVICE_DELETED: %w", id, err)
	}
	return nil
}

// GetFD hands fd to QEMU under name (for netdev_add tap,fd=name).
func (c *Client) GetFD(ctx context.Context, name string, fd int) error {
	return c.ExecuteWithFD(ctx, "getfd", map[string]any{"fdname": name}, nil, fd)
}

// CloseFD drops a file descriptor handed with GetFD.
func (c *Client) CloseFD(ctx context.Context, name string) error {
	return c.Execute(ctx, "closefd", map[string]any{"fdname": name}, nil)
}

// NetdevAdd adds a network backend (typ "tap", with props such as "fd").
func (c *Client) NetdevAdd(ctx context.Context, typ, id string, props map[string]any) error {
	args := map[string]any{"type": typ, "id": id}
	for k, v := range props {
		args[k] = v
	}
	return c.Execute(ctx, "netdev_add", args, nil)
}

// NetdevDel removes a network backend.
func (c *Client) NetdevDel(ctx context.Context, id string) error {
	return c.Execute(ctx, "netdev_del", map[string]any{"id": id}, nil)
}

// Capability is a migration capability's setting.
type Capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// MigrateSetCapabilities sets migration capabilities (x-ignore-shared for
// a template whose RAM is a shared file, for instance). Both the saving
// and the restoring QEMU need the same.
func (c *Client) MigrateSetCapabilities(ctx context.Context, caps ...Capability) error {
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil)
}

// Migrate starts saving the VM to uri ("exec:cat > file", "unix:path").
// It returns at once: wait for the MIGRATION event with status
// "completed" (MigrateAndWait does).
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming starts restoring a VM started with -incoming defer from
// uri ("exec:cat file"). It returns at once: wait for MIGRATION completed.
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// MigrationInfo is the reply of query-migrate.
type MigrationInfo struct {
	Status    string `json:"status"` // "setup", "active", "completed", "failed", ...
	ErrorDesc string `json:"error-desc,omitempty"`
	TotalTime int64  `json:"total-time,omitempty"` // ms
	RAM       *struct {
		Transferred int64 `json:"transferred"`
		Total       int64 `json:"total"`
	} `json:"ram,omitempty"`
}

// QueryMigrate returns the state of the current migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var m MigrationInfo
	err := c.Execute(ctx, "query-migrate", nil, &m)
	return m, err
}

// MigrationEnded is true for the MIGRATION event's final statuses.
func MigrationEnded(status string) bool {
	return status == "completed" || status == "failed" || status == "cancelled"
}

// RunMigration runs start (Migrate or MigrateIncoming) and waits for the
// migration to complete; a failed one is an error with QEMU's reason. It
// turns on the "events" capability, without which QEMU sends no MIGRATION
// events.
func (c *Client) RunMigration(ctx context.Context, start func(context.Context) error) error {
	sub := c.Subscribe("MIGRATION")
	defer sub.Close()
	if err := c.MigrateSetCapabilities(ctx, Capability{Capability: "events", State: true}); err != nil {
		return err
	}
	if err := start(ctx); err != nil {
		return err
	}
	e, err := sub.Wait(ctx, func(e Event) bool {
		var d struct {
			Status string `json:"status"`
		}
		return json.Unmarshal(e.Data, &d) == nil && MigrationEnded(d.Status)
	})
	if err != nil {
		return fmt.Errorf("qmp: waiting for the migration: %w", err)
	}
	var d struct {
		Status string `json:"status"`
	}
	_ = json.Unmarshal(e.Data, &d)
	if d.Status != "completed" {
		info, _ := c.QueryMigrate(ctx)
		return fmt.Errorf("qmp: migration %s: %s", d.Status, info.ErrorDesc)
	}
	return nil
}
