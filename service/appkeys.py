"""Typed application keys: every shared client the handlers reach through `request.app`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from core.api_scripts import ApiScripts
from core.registry import PipelineRegistry
from core.settings import Settings
from core.store import BatchStore
from service.abandon import Abandoner
from service.cache import BatchCache
from service.command_sender import CommandSender
from service.idempotency import IdempotencyKeys
from service.waiters import ChangeWaiters

if TYPE_CHECKING:
    from service.metrics import RequestStats

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
REGISTRY = web.AppKey("registry", PipelineRegistry)
STORE = web.AppKey("store", BatchStore)
CACHE = web.AppKey("cache", BatchCache)
WAITERS = web.AppKey("waiters", ChangeWaiters)
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# Typed by annotation: service.metrics reads the keys above (an import here would be a cycle).
REQUEST_STATS: web.AppKey[RequestStats] = web.AppKey("request_stats")
PRODUCER = web.AppKey("producer", AIOKafkaProducer)
COMMANDS = web.AppKey("commands", CommandSender)
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyKeys)
ABANDONER = web.AppKey("abandoner", Abandoner)
API_SCRIPTS = web.AppKey("api_scripts", ApiScripts)
