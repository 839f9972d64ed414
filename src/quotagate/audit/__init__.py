"""The audit log: who changed which key or membership, when and from where."""

from quotagate.audit.log import AuditLog, record, record_anonymous

__all__ = ["AuditLog", "record", "record_anonymous"]
